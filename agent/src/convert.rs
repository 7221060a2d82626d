//! Pull→Pop conversion: a classic push consumer's PULL is served with
//! broker-side POP and its offset commits become ACKs, so any number of
//! consumers share every queue and a hung consumer's messages come back to
//! the others after the invisible time. See protocol.md §4.2 for the design;
//! the rules that keep messages from being lost live in `pop::session`.
//!
//! Only groups the policy selects, that are clustering push consumers, and
//! that never sent LOCK_BATCH_MQ are converted; everything else is relayed.
//! Clients that speak POP themselves are relayed too, with their
//! acknowledgements routed to the broker that served the pop (`pop_native`).
//!
//! A converted PULL's POP may go to any readable broker of the topic
//! (`pop::route::Chooser`): receipts remember the broker that served them, and
//! every ACK, CHANGE_INVISIBLETIME and dead-letter move goes there.
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::{debug, info, warn};

use crate::broker_client::{BrokerClients, BrokerError};
use crate::codec::code;
use crate::codec::header::Header;
use crate::codec::{decode_frame, encode_frame, Limits};
use crate::metrics::Metrics;
use crate::pop::heartbeat::{parse_heartbeat, ConsumerData};
use crate::pop::policy::{ConvertPolicy, Decision};
use crate::pop::receipt::{receipts_from_pop, renewed, Receipt};
use crate::pop::ackroute::AckKey;
use crate::pop::route::{parse_route, Chooser, RouteBroker};
use crate::pop::session::{Renewal, SessionKey, Sessions};
use crate::pop::requests::BitSetFormat;
use crate::pop::{batch, requests};
use crate::pop_native::NativePop;
use crate::relay::{ConnHandle, Interceptor, Verdict, Watch};
use crate::state::now_ms;

#[derive(Debug, Clone)]
pub struct ConvertConfig {
    pub policy: ConvertPolicy,
    /// How long a popped message stays invisible to other consumers before
    /// the broker redelivers it (renewed while the client still holds it).
    pub invisible: Duration,
    /// Invisible time given to messages the agent releases (never delivered,
    /// or their client is gone), so they come back almost at once.
    pub release: Duration,
    /// Redeliveries before the dead-letter queue; None = what the SDK asks (default 16).
    pub max_reconsume: Option<i32>,
    /// Fixed delay before a message the client sent back comes again; None = the
    /// broker's delay levels.
    pub retry_delay: Option<Duration>,
    /// Route Pop-native clients' acknowledgements to the broker that served the pop.
    pub ack_routing: bool,
}

/// Response codes of POP that mean "nothing to deliver now".
const POLLING_FULL: i32 = 209;
const POLLING_TIMEOUT: i32 = 210;
const NO_MESSAGE: i32 = 208;
/// POP can return at most this many messages.
const MAX_POP_BATCH: i32 = 32;
/// A client that sent nothing for this long is treated as hung: its receipts
/// are left to expire. Live SDKs commit offsets every 5 s and re-issue
/// long-poll PULLs at least every ~15 s.
const LIVENESS_MS: u64 = 15_000;
/// Renew receipts this close to becoming visible again.
const RENEW_MARGIN_MS: i64 = 10_000;
const RENEW_EVERY: Duration = Duration::from_secs(5);
/// A broker that failed a POP (no connection, no answer) is passed over this long.
const BROKER_DOWN_MS: u64 = 30_000;
/// How long a hand-over waits for a connection's acknowledgements, send-backs and
/// renewals to be answered before its state is copied (a renewal times out after 5 s).
const QUIESCE: Duration = Duration::from_secs(6);

struct GroupState {
    consumer: ConsumerData,
    decision: Decision,
}

/// A converted PULL the agent is answering.
struct PullInFlight {
    /// The client's queueOffset: a hand-over answers "no new message" from here.
    x: i64,
    /// Its session and generation, once its commit and release were applied.
    started: Option<(SessionKey, u64)>,
}

/// What the converter knows about one pod connection.
struct ConnState {
    handle: ConnHandle,
    client_id: Mutex<Option<String>>,
    groups: Mutex<HashMap<String, GroupState>>,
    /// Lock order: `pulls` before `sessions`. Holding `pulls` while a PULL is applied and
    /// answered makes a hand-over see all of it or none of it.
    pulls: Mutex<HashMap<i32, PullInFlight>>,
    sessions: Mutex<Sessions>,
    /// Taken requests other than PULL still being handled (their answers are due).
    busy: Arc<AtomicUsize>,
    /// Moving to a successor agent: no new renewals.
    moving: AtomicBool,
    closed: AtomicBool,
    /// When the client last sent anything; receipts of a silent client are
    /// not renewed, so a hung consumer's messages go to the others.
    last_request_ms: AtomicU64,
}

impl ConnState {
    fn new(handle: ConnHandle, client_id: Option<String>, groups: HashMap<String, GroupState>, sessions: Sessions) -> Self {
        ConnState {
            handle,
            client_id: Mutex::new(client_id),
            groups: Mutex::new(groups),
            pulls: Default::default(),
            sessions: Mutex::new(sessions),
            busy: Default::default(),
            moving: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            last_request_ms: AtomicU64::new(now_ms()),
        }
    }

    /// Answers a converted PULL unless a hand-over already did.
    fn answer_pull(&self, opaque: i32, (h, body): (Header, Vec<u8>)) {
        let mut pulls = lock(&self.pulls);
        if pulls.remove(&opaque).is_some() {
            self.handle.send_to_client(encode_frame(&h, &body));
        }
    }
}

/// Counts a running task (or a request being handled) until dropped.
struct Tracked(Arc<AtomicUsize>);

impl Tracked {
    fn new(n: &Arc<AtomicUsize>) -> Self {
        n.fetch_add(1, Ordering::SeqCst);
        Tracked(n.clone())
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

pub struct Converter {
    cfg: ConvertConfig,
    brokers: Arc<BrokerClients>,
    metrics: Arc<Metrics>,
    limits: Limits,
    conns: Mutex<HashMap<u64, Arc<ConnState>>>,
    orderly: Mutex<HashSet<String>>,
    /// Broker address → broker name, learned from route responses relayed to pods.
    broker_names: Mutex<HashMap<SocketAddr, String>>,
    /// Topics of route lookups awaiting their answer, by (connection, opaque).
    route_requests: Mutex<HashMap<(u64, i32), String>>,
    chooser: Mutex<Chooser>,
    /// Per broker: the BATCH_ACK bit-set format it takes, None if none (single ACKs).
    batch_formats: Mutex<HashMap<SocketAddr, Option<BitSetFormat>>>,
    native: Option<NativePop>,
    /// Tasks that talk to brokers for clients (handlers, acks, releases): an agent that
    /// hands over waits for them before it exits.
    tasks: Arc<AtomicUsize>,
    /// For spawning request handlers from `&self` trait methods.
    me: std::sync::Weak<Converter>,
}

impl Converter {
    pub fn new(cfg: ConvertConfig, brokers: Arc<BrokerClients>, metrics: Arc<Metrics>, limits: Limits) -> Arc<Self> {
        let native = cfg.ack_routing.then(|| NativePop::new(brokers.clone(), metrics.clone(), limits));
        let c = Arc::new_cyclic(|me| Converter {
            cfg,
            brokers,
            metrics,
            limits,
            conns: Default::default(),
            orderly: Default::default(),
            broker_names: Default::default(),
            route_requests: Default::default(),
            chooser: Default::default(),
            batch_formats: Default::default(),
            native,
            tasks: Default::default(),
            me: me.clone(),
        });
        tokio::spawn(renew_loop(Arc::downgrade(&c)));
        c
    }

    fn state(&self, conn: &ConnHandle) -> Arc<ConnState> {
        lock(&self.conns)
            .entry(conn.id)
            .or_insert_with(|| {
                Arc::new(ConnState::new(conn.clone(), None, HashMap::new(), Sessions::default()))
            })
            .clone()
    }

    /// Spawns work an exiting agent waits for (see [`Converter::settle`]).
    fn spawn(&self, f: impl std::future::Future<Output = ()> + Send + 'static) {
        let t = Tracked::new(&self.tasks);
        tokio::spawn(async move {
            f.await;
            drop(t);
        });
    }

    fn existing(&self, conn: &ConnHandle) -> Option<Arc<ConnState>> {
        lock(&self.conns).get(&conn.id).cloned()
    }

    fn converted(&self, conn: &ConnHandle, group: &str) -> bool {
        self.existing(conn)
            .is_some_and(|st| lock(&st.groups).get(group).is_some_and(|g| g.decision == Decision::Convert))
    }

    /// Pending receipts per (group, topic), for the state dump.
    pub fn pending(&self) -> Vec<(String, String, u64)> {
        let mut out: HashMap<(String, String), u64> = HashMap::new();
        for st in lock(&self.conns).values() {
            for ((g, t), n) in lock(&st.sessions).pending_counts() {
                *out.entry((g, t)).or_default() += n as u64;
            }
        }
        let mut v: Vec<_> = out.into_iter().map(|((g, t), n)| (g, t, n)).collect();
        v.sort();
        v
    }

    fn on_heartbeat(&self, conn: &ConnHandle, body: &[u8]) {
        let hb = match parse_heartbeat(body) {
            Ok(hb) => hb,
            Err(e) => return warn!(pod = %conn.pod, error = %e, "cannot parse a heartbeat body; its groups are relayed unconverted"),
        };
        let st = self.state(conn);
        *lock(&st.client_id) = Some(hb.client_id.clone());
        let orderly = lock(&self.orderly).clone();
        let mut groups = lock(&st.groups);
        for consumer in hb.consumers {
            let decision = self.cfg.policy.decide(&consumer, orderly.contains(&consumer.group_name));
            let changed = groups.get(&consumer.group_name).is_none_or(|g| g.decision != decision);
            if changed {
                self.metrics.conversion_decision(decision == Decision::Convert);
                match decision {
                    Decision::Convert => info!(pod = %conn.pod, group = %consumer.group_name, client = %hb.client_id, "converting this consumer group from PULL to POP"),
                    Decision::PassThrough(why) => info!(pod = %conn.pod, group = %consumer.group_name, reason = why, "consumer group relayed unconverted"),
                }
            }
            groups.insert(consumer.group_name.clone(), GroupState { consumer, decision });
        }
    }

    fn on_lock(&self, body: &[u8]) {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else { return };
        let Some(group) = v.get("consumerGroup").and_then(|g| g.as_str()) else { return };
        if lock(&self.orderly).insert(group.to_string()) {
            info!(group, "orderly consumer group (LOCK_BATCH_MQ): relayed unconverted from now on");
            for st in lock(&self.conns).values() {
                if let Some(g) = lock(&st.groups).get_mut(group) {
                    g.decision = Decision::PassThrough("orderly consumer (sent LOCK_BATCH_MQ)");
                }
            }
        }
    }

    /// Entries in the Pop-native ack-routing table.
    pub fn ack_routes(&self) -> usize {
        self.native.as_ref().map_or(0, |n| n.routes())
    }

    /// The route cache, for the state dump.
    pub fn routes(&self) -> Vec<crate::state::RouteView> {
        lock(&self.chooser)
            .snapshot(now_ms())
            .into_iter()
            .map(|(topic, brokers)| crate::state::RouteView {
                topic,
                brokers: brokers
                    .into_iter()
                    .map(|(b, down, pops_in_flight)| crate::state::RouteBrokerView { name: b.name, addr: b.addr.to_string(), readable: b.readable, down, pops_in_flight })
                    .collect(),
            })
            .collect()
    }

    fn on_route(&self, topic: Option<String>, body: &[u8]) {
        let route = parse_route(body);
        lock(&self.broker_names).extend(route.names);
        if let Some(t) = topic {
            lock(&self.chooser).learn(&t, route.masters);
        }
    }

    fn broker_name(&self, addr: SocketAddr) -> Option<String> {
        lock(&self.broker_names).get(&addr).cloned()
    }

    fn reply(&self, st: &ConnState, header: Header, body: &[u8]) {
        st.handle.send_to_client(encode_frame(&header, body));
    }

    async fn handle(self: Arc<Self>, st: Arc<ConnState>, h: Header, frame: Vec<u8>) {
        let ext = |k: &str| h.ext(k).unwrap_or("").to_string();
        let num = |k: &str| h.ext(k).and_then(|v| v.parse::<i64>().ok());
        match h.code {
            code::GET_CONSUMER_LIST_BY_GROUP => {
                // Every client owns every queue: no idle consumers, no rebalance churn.
                let me = lock(&st.client_id).clone().unwrap_or_default();
                let (rh, body) = requests::consumer_list(h.opaque, &[me]);
                self.reply(&st, rh, &body);
            }
            code::QUERY_CONSUMER_OFFSET => {
                let (rh, body) = requests::query_offset(h.opaque, 0);
                self.reply(&st, rh, &body);
            }
            code::UPDATE_CONSUMER_OFFSET => {
                let (group, topic) = (ext("consumerGroup"), ext("topic"));
                let (q, c) = (num("queueId").unwrap_or(-1) as i32, num("commitOffset").unwrap_or(-1));
                let acks = lock(&st.sessions).on_commit(&SessionKey::new(&group, &topic, q), c);
                debug!(pod = %st.handle.pod, %group, %topic, queue = q, commit = c, acked = acks.len(), "offset commit");
                self.ack(&st, &group, acks).await;
                if !h.is_oneway() {
                    let (rh, body) = requests::simple_ok(h.opaque);
                    self.reply(&st, rh, &body);
                }
            }
            code::PULL_MESSAGE => self.pull(&st, &h).await,
            code::CONSUMER_SEND_MSG_BACK => self.send_back(&st, &h, frame).await,
            other => debug!(code = other, "taken frame with no handler; dropped"),
        }
    }

    async fn pull(&self, st: &Arc<ConnState>, h: &Header) {
        let num = |k: &str| h.ext(k).and_then(|v| v.parse::<i64>().ok());
        let group = h.ext("consumerGroup").unwrap_or("").to_string();
        let topic = h.ext("topic").unwrap_or("").to_string();
        let vq = num("queueId").unwrap_or(0) as i32;
        let x = num("queueOffset").unwrap_or(0);
        let sys_flag = num("sysFlag").unwrap_or(0);
        let max = (num("maxMsgNums").unwrap_or(32) as i32).clamp(1, MAX_POP_BATCH);
        let suspend = num("suspendTimeoutMillis").unwrap_or(15_000);

        // Receipts at or above X were never seen by the client: give them back.
        let key = SessionKey::new(&group, &topic, vq);
        let (release, acks, generation) = {
            let mut pulls = lock(&st.pulls);
            // Answered by a hand-over before it started: the successor gets the next one.
            let Some(p) = pulls.get_mut(&h.opaque) else { return };
            let mut s = lock(&st.sessions);
            // Commit first: it covers offsets below X, the release covers X and above.
            let acks = if sys_flag & 0x1 != 0 { s.on_commit(&key, num("commitOffset").unwrap_or(-1)) } else { Vec::new() };
            let release = s.on_pull(&key, x);
            let generation = s.generation(&key).unwrap_or(0);
            p.started = Some((key.clone(), generation));
            (release, acks, generation)
        };
        if !release.is_empty() || !acks.is_empty() {
            debug!(pod = %st.handle.pod, %group, %topic, queue = vq, offset = x, acked = acks.len(), released = release.len(), "PULL commits and re-pull releases");
        }
        // The POP need not wait for the commit's ACKs: they are for other messages.
        self.ack_later(st, &group, acks);
        self.release(st, &group, release);

        let (init_mode, exp_type, exp) = {
            let groups = lock(&st.groups);
            let g = groups.get(&group);
            let sub = g.and_then(|g| g.consumer.subscription(&topic));
            (
                g.map(|g| g.consumer.consume_from_where.init_mode()).unwrap_or(0),
                sub.map(|s| s.expression_type.clone()).unwrap_or_else(|| "TAG".into()),
                sub.map(|s| s.sub_string.clone()).unwrap_or_else(|| "*".into()),
            )
        };
        // Long-poll on the broker for as long as the client suspends, less a
        // margin so the answer beats the client's own RPC timeout.
        let poll_ms = if sys_flag & 0x2 != 0 { (suspend - 1000).clamp(0, 20_000) } else { 0 };
        // Any readable broker of the topic can serve this PULL: the least busy one
        // that is up, preferring the one the client addressed.
        let preferred = st.handle.dst.0;
        let mut addr = lock(&self.chooser).pick(&topic, preferred, now_ms());
        let mut tried = Vec::new();
        let (rh, mut body, broker_name) = loop {
            tried.push(addr);
            let Some(broker_name) = self.broker_name(addr) else {
                warn!(broker = %addr, "broker name not learned yet (no route lookup seen through the agent); the client retries");
                return st.answer_pull(h.opaque, requests::system_busy(h.opaque, "rmq-agent: broker name unknown yet, retry"));
            };
            let opaque = self.brokers.opaque();
            let (ph, pbody) = requests::pop(opaque, &group, &topic, -1, max, self.cfg.invisible.as_millis() as i64, poll_ms, now_ms() as i64, init_mode, &exp_type, &exp);
            self.metrics.pop("pop");
            lock(&self.chooser).started(addr);
            let res = self.brokers.request(addr, ph, &pbody, Duration::from_millis(poll_ms as u64 + 5000)).await;
            lock(&self.chooser).finished(addr);
            match res {
                Ok((rh, body)) => {
                    lock(&self.chooser).mark_up(addr);
                    break (rh, body, broker_name);
                }
                Err(e) => {
                    lock(&self.chooser).mark_down(addr, now_ms(), BROKER_DOWN_MS);
                    // Refused or dropped at once: another broker can still answer in time.
                    let fast = matches!(e, BrokerError::Connect { .. } | BrokerError::Closed(_));
                    let next = if fast { lock(&self.chooser).another(&topic, &tried, now_ms()) } else { None };
                    warn!(pod = %st.handle.pod, %group, %topic, broker = %addr, error = %e, next = ?next, "POP failed; the broker is passed over for a while");
                    match next {
                        Some(n) => {
                            self.metrics.pop("pop_failover");
                            addr = n;
                        }
                        None => return st.answer_pull(h.opaque, requests::system_busy(h.opaque, &format!("rmq-agent: {e}"))),
                    }
                }
            }
        };
        if addr != preferred {
            self.metrics.pop("pop_elsewhere");
            debug!(pod = %st.handle.pod, %group, %topic, addressed = %preferred, served_by = %addr, "PULL served by another broker of the topic");
        }
        match rh.code {
            0 => {}
            code::PULL_NOT_FOUND | POLLING_TIMEOUT | NO_MESSAGE => return st.answer_pull(h.opaque, requests::pull_not_found(h.opaque, x)),
            POLLING_FULL => return st.answer_pull(h.opaque, requests::system_busy(h.opaque, "rmq-agent: broker polling queue full")),
            c => {
                warn!(pod = %st.handle.pod, %group, %topic, code = c, remark = rh.remark.as_deref().unwrap_or(""), "broker refused POP");
                return st.answer_pull(h.opaque, requests::system_busy(h.opaque, &format!("rmq-agent: POP answered {c}")));
            }
        }
        let popped = match receipts_from_pop(&rh, &body, &broker_name, &topic) {
            Ok(p) => p,
            Err(e) => {
                warn!(pod = %st.handle.pod, %group, %topic, error = %e, "cannot parse a POP response; its messages come back after the invisible time");
                return st.answer_pull(h.opaque, requests::system_busy(h.opaque, "rmq-agent: bad POP response"));
            }
        };
        let (msgs, mut receipts): (Vec<_>, Vec<_>) = popped.into_iter().unzip();
        for r in receipts.iter_mut() {
            r.broker_addr = Some(addr);
        }
        // A newer PULL for this queue, a closed connection, or one that moved to another
        // agent means nobody will ever see these: release them instead of delivering.
        // `pulls` stays locked until the answer is queued (see `ConnState::pulls`).
        let mut pulls = lock(&st.pulls);
        if st.closed.load(Ordering::Relaxed) || pulls.remove(&h.opaque).is_none() {
            drop(pulls);
            return self.release(st, &group, receipts);
        }
        let n = msgs.len() as i64;
        let next = match lock(&st.sessions).assign(&key, generation, x, receipts) {
            Ok(next) => next,
            Err(stale) => {
                drop(pulls);
                debug!(pod = %st.handle.pod, %group, %topic, queue = vq, offset = x, released = stale.len(), "POP answered a superseded PULL; releasing");
                return self.release(st, &group, stale);
            }
        };
        for (i, msg) in msgs.iter().enumerate() {
            // Clients track progress by queue offset; give them offsets that
            // continue from their own request.
            let _ = batch::rewrite_queue_offset(&mut body, msg, x + i as i64);
            let _ = batch::rewrite_queue_id(&mut body, msg, vq);
        }
        let rest = rh.ext("restNum").and_then(|v| v.parse::<i64>().ok()).unwrap_or(0);
        let (fh, fb) = requests::pull_found(h.opaque, next, 0, next + rest, &body);
        self.metrics.pop_messages(n as u64);
        self.reply(st, fh, &fb);
        lock(&st.sessions).mark_delivered(&key, generation);
        drop(pulls);
    }

    async fn send_back(&self, st: &Arc<ConnState>, h: &Header, frame: Vec<u8>) {
        let group = h.ext("group").unwrap_or("").to_string();
        let commit_log = h.ext("offset").and_then(|v| v.parse::<i64>().ok()).unwrap_or(-1);
        let delay_level = h.ext("delayLevel").and_then(|v| v.parse::<i32>().ok()).unwrap_or(0);
        // SDKs send -1 for "the group's default", which is 16.
        let asked = h.ext("maxReconsumeTimes").and_then(|v| v.parse::<i32>().ok()).filter(|&m| m > 0).unwrap_or(16);
        let max_reconsume = self.cfg.max_reconsume.unwrap_or(asked);
        let uniq = h.ext("originMsgId").map(str::to_string);
        let receipt = lock(&st.sessions).nack(&group, commit_log, uniq.as_deref()).map(|(_, r)| r);
        let Some(r) = receipt else {
            // Not one of ours (e.g. a message from before a restart): let the broker handle it.
            return self.forward(st, h, frame).await;
        };
        if r.reconsume_times + 1 >= max_reconsume || delay_level < 0 {
            // Pop revive has no dead-letter queue: move it there like a classic send-back, then ACK.
            let opaque = self.brokers.opaque();
            let (dh, db) = requests::send_msg_back_to_dlq(opaque, &group, &r, max_reconsume);
            let res = self.brokers.request(served_by(st, &r), dh, &db, Duration::from_secs(5)).await;
            let code = res.as_ref().map(|(rh, _)| rh.code).unwrap_or(code::SYSTEM_ERROR);
            if code == 0 {
                self.metrics.pop("dlq");
                info!(pod = %st.handle.pod, %group, msg = r.uniq_key.as_deref().unwrap_or(""), "message exceeded its reconsume limit; moved to the dead-letter queue");
                self.ack(st, &group, vec![r]).await;
            } else {
                warn!(pod = %st.handle.pod, %group, code, "moving a message to the dead-letter queue failed; it comes back after the invisible time");
            }
            let resp = Header::response(code, h.opaque, None);
            return self.reply(st, resp, &[]);
        }
        let delay = self.cfg.retry_delay.unwrap_or_else(|| retry_delay(delay_level, r.reconsume_times));
        debug!(pod = %st.handle.pod, %group, reconsume = r.reconsume_times, delay_ms = delay.as_millis() as u64, "client sent a message back; it comes again after the delay");
        self.change_invisible(st, &group, r, delay);
        let (rh, b) = requests::simple_ok(h.opaque);
        self.reply(st, rh, &b);
    }

    /// Relays a taken request to its broker over the agent's connection and
    /// the answer back to the client.
    async fn forward(&self, st: &Arc<ConnState>, h: &Header, frame: Vec<u8>) {
        let Ok((_, body_range)) = decode_frame(&frame, &self.limits) else { return };
        let mut fh = h.clone();
        fh.opaque = self.brokers.opaque();
        match self.brokers.request(st.handle.dst.0, fh, &frame[body_range], Duration::from_secs(10)).await {
            Ok((mut rh, body)) => {
                rh.opaque = h.opaque;
                self.reply(st, rh, &body);
            }
            Err(e) => {
                let (rh, b) = requests::system_busy(h.opaque, &format!("rmq-agent: {e}"));
                self.reply(st, rh, &b);
            }
        }
    }

    /// ACKs `receipts` at the brokers that served them: one BATCH_ACK per broker where the
    /// broker takes one (a single ACK_MESSAGE each would be one store write each), single
    /// ACKs, sent concurrently, for the rest.
    async fn ack(&self, st: &Arc<ConnState>, group: &str, receipts: Vec<Receipt>) {
        let mut by_broker: Vec<(SocketAddr, Vec<Receipt>)> = Vec::new();
        for r in receipts {
            let addr = served_by(st, &r);
            match by_broker.iter_mut().find(|(a, _)| *a == addr) {
                Some((_, v)) => v.push(r),
                None => by_broker.push((addr, vec![r])),
            }
        }
        let mut singles = tokio::task::JoinSet::new();
        for (addr, rs) in by_broker {
            let (batch, single): (Vec<Receipt>, Vec<Receipt>) = rs.into_iter().partition(|r| requests::batch_ackable(group, &r.broker_name, r));
            let mut single = single;
            if !batch.is_empty() {
                if let Err(back) = self.batch_ack(addr, group, batch).await {
                    single.extend(back);
                }
            }
            for r in single {
                let (brokers, metrics, group) = (self.brokers.clone(), self.metrics.clone(), group.to_string());
                singles.spawn(async move {
                    let (ah, ab) = requests::ack(brokers.opaque(), &group, &r);
                    match brokers.request(addr, ah, &ab, Duration::from_secs(5)).await {
                        Ok((rh, _)) if rh.code == 0 => metrics.pop("ack"),
                        Ok((rh, _)) => warn!(%group, code = rh.code, "ACK refused; the message may be delivered again"),
                        Err(e) => warn!(%group, error = %e, "ACK failed; the message may be delivered again"),
                    }
                });
            }
        }
        while singles.join_next().await.is_some() {}
    }

    /// One BATCH_ACK to `addr`. Brokers disagree on how its bit sets are written (Java:
    /// base64; rocketmq-rust: byte arrays) and old ones have no BATCH_ACK: the first
    /// batch to a broker finds out, later ones use what worked. `Err` gives back the
    /// receipts to ACK one by one.
    async fn batch_ack(&self, addr: SocketAddr, group: &str, receipts: Vec<Receipt>) -> Result<(), Vec<Receipt>> {
        let known = lock(&self.batch_formats).get(&addr).copied();
        let tries = match known {
            Some(Some(f)) => vec![f],
            Some(None) => return Err(receipts),
            None => vec![BitSetFormat::JavaBase64, BitSetFormat::RustByteArray],
        };
        let broker_name = receipts[0].broker_name.clone();
        for f in tries {
            let Ok((h, body)) = requests::batch_ack_with(self.brokers.opaque(), group, &broker_name, &receipts, f) else { return Err(receipts) };
            match self.brokers.request(addr, h, &body, Duration::from_secs(5)).await {
                Ok((rh, _)) if rh.code == 0 => {
                    if known.is_none() {
                        info!(broker = %addr, format = ?f, "broker takes BATCH_ACK; converted groups' commits use it");
                        lock(&self.batch_formats).insert(addr, Some(f));
                    }
                    self.metrics.pop("batch_ack");
                    self.metrics.pop_n("ack", receipts.len() as u64);
                    return Ok(());
                }
                // Finding out the format: try the other one.
                Ok((rh, _)) if known.is_none() => debug!(broker = %addr, format = ?f, code = rh.code, "BATCH_ACK refused in this bit-set format"),
                Ok((rh, _)) => {
                    warn!(broker = %addr, %group, code = rh.code, "BATCH_ACK refused; acknowledging one by one");
                    return Err(receipts);
                }
                Err(e) => {
                    warn!(broker = %addr, %group, error = %e, "BATCH_ACK failed; acknowledging one by one");
                    return Err(receipts);
                }
            }
        }
        info!(broker = %addr, "broker takes no BATCH_ACK in either bit-set format; acknowledging one by one");
        lock(&self.batch_formats).insert(addr, None);
        Err(receipts)
    }

    fn ack_later(&self, st: &Arc<ConnState>, group: &str, receipts: Vec<Receipt>) {
        if receipts.is_empty() {
            return;
        }
        let (st, group) = (st.clone(), group.to_string());
        if let Some(me) = self.me.upgrade() {
            self.spawn(async move { me.ack(&st, &group, receipts).await });
        }
    }

    fn release(&self, st: &Arc<ConnState>, group: &str, receipts: Vec<Receipt>) {
        for r in receipts {
            self.change_invisible(st, group, r, self.cfg.release);
        }
    }

    /// Fire-and-forget CHANGE_INVISIBLETIME (release, retry delay).
    fn change_invisible(&self, st: &Arc<ConnState>, group: &str, r: Receipt, after: Duration) {
        self.spawn(self.change_invisible_call(st, group, r, after));
    }

    fn change_invisible_call(&self, st: &Arc<ConnState>, group: &str, r: Receipt, after: Duration) -> impl std::future::Future<Output = ()> + Send + 'static {
        let (brokers, addr, group, metrics) = (self.brokers.clone(), served_by(st, &r), group.to_string(), self.metrics.clone());
        async move {
            let (ch, cb) = requests::change_invisible(brokers.opaque(), &group, &r, after.as_millis() as i64);
            match brokers.request(addr, ch, &cb, Duration::from_secs(5)).await {
                Ok((rh, _)) if rh.code == 0 => metrics.pop("change_invisible"),
                Ok((rh, _)) => debug!(%group, code = rh.code, "CHANGE_INVISIBLETIME refused (the message revives on its own)"),
                Err(e) => debug!(%group, error = %e, "CHANGE_INVISIBLETIME failed (the message revives on its own)"),
            }
        }
    }

    /// At exit: releases every receipt still held for open connections (they close with
    /// the process), waiting up to `limit` for the broker to take the releases.
    pub async fn release_everything(&self, limit: Duration) {
        let conns: Vec<Arc<ConnState>> = lock(&self.conns).drain().map(|(_, st)| st).collect();
        let mut calls = Vec::new();
        for st in conns {
            st.closed.store(true, Ordering::Relaxed);
            let groups: Vec<String> = lock(&st.groups).keys().cloned().collect();
            for group in groups {
                for r in lock(&st.sessions).take_group(&group) {
                    calls.push(tokio::spawn(self.change_invisible_call(&st, &group, r, self.cfg.release)));
                }
            }
        }
        if calls.is_empty() {
            return;
        }
        let n = calls.len();
        let all = async {
            for c in calls {
                let _ = c.await;
            }
        };
        match tokio::time::timeout(limit, all).await {
            Ok(()) => info!(receipts = n, "released the receipts of connections still open at exit"),
            Err(_) => warn!(receipts = n, "not every receipt release finished before exit; those messages come back after their invisible time"),
        }
    }

    async fn renew(&self) {
        let conns: Vec<Arc<ConnState>> = lock(&self.conns).values().cloned().collect();
        for st in conns {
            let silent_ms = now_ms().saturating_sub(st.last_request_ms.load(Ordering::Relaxed));
            if silent_ms > LIVENESS_MS || st.moving.load(Ordering::SeqCst) {
                continue;
            }
            let due = lock(&st.sessions).due_for_renewal(now_ms() as i64, RENEW_MARGIN_MS);
            if !due.is_empty() {
                debug!(pod = %st.handle.pod, due = due.len(), "renewing receipts the client still holds");
            }
            for (key, offset, r) in due {
                // Moving to a successor: it renews from the handles it gets, so none may change now.
                if st.moving.load(Ordering::SeqCst) {
                    lock(&st.sessions).renewal_failed(&key, offset, &r);
                    continue;
                }
                let opaque = self.brokers.opaque();
                let (ch, cb) = requests::change_invisible(opaque, &key.group, &r, self.cfg.invisible.as_millis() as i64);
                let res = self.brokers.request(served_by(&st, &r), ch, &cb, Duration::from_secs(5)).await;
                let new = match res {
                    Ok((rh, _)) => renewed(&r, &rh).map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                let new = match new {
                    Ok(n) => n,
                    Err(e) => {
                        warn!(pod = %st.handle.pod, group = %key.group, error = %e, "renewing a receipt failed; the message may be delivered again");
                        self.metrics.pop("renew_failed");
                        lock(&st.sessions).renewal_failed(&key, offset, &r);
                        continue;
                    }
                };
                self.metrics.pop("renew");
                // The client may have committed or re-pulled while the renewal was in flight.
                match lock(&st.sessions).replace(&key, offset, new) {
                    Renewal::Stored => {}
                    Renewal::Ack(r) => self.ack_later(&st, &key.group, vec![r]),
                    Renewal::Release(r) => self.release(&st, &key.group, vec![r]),
                }
            }
        }
    }
}

/// A connection's Pull→Pop and ack-routing state, as it moves to a successor agent.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct ConnSnapshot {
    client_id: Option<String>,
    /// Each group the client registered, and whether it is converted.
    groups: Vec<(ConsumerData, bool)>,
    sessions: Sessions,
    /// Route lookups awaiting their answer: (opaque, topic).
    route_requests: Vec<(i32, String)>,
    /// Pop-native requests awaiting their answer.
    native: serde_json::Value,
}

/// What every connection shares: learned routes and broker facts, and the ack-routing table.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct SharedSnapshot {
    broker_names: Vec<(SocketAddr, String)>,
    routes: Vec<(String, Vec<RouteBroker>)>,
    orderly: Vec<String>,
    batch_formats: Vec<(SocketAddr, Option<BitSetFormat>)>,
    ack_routes: Vec<(AckKey, SocketAddr, u64)>,
}

impl Converter {
    /// The connection paused for a hand-over: answer its PULLs still waiting on a POP ("no
    /// new message"; their messages are released when the POP returns), wait until its
    /// other requests and renewals are answered, and give up its state for the successor.
    async fn export_conn(&self, conn: &ConnHandle) -> Option<String> {
        let route_requests = crate::pop::take_conn_entries(&mut lock(&self.route_requests), conn.id);
        let native = self.native.as_ref().map(|n| n.export_conn(conn)).unwrap_or_default();
        let mut snap = ConnSnapshot { route_requests, native, ..Default::default() };
        if let Some(st) = self.existing(conn) {
            st.moving.store(true, Ordering::SeqCst);
            let answered = {
                let mut pulls = lock(&st.pulls);
                let mut sessions = lock(&st.sessions);
                let n = pulls.len();
                for (opaque, p) in pulls.drain() {
                    if let Some((key, generation)) = p.started {
                        sessions.abandon_pull(&key, generation);
                    }
                    let (rh, body) = requests::pull_not_found(opaque, p.x);
                    self.reply(&st, rh, &body);
                }
                n
            };
            let quiet = || st.busy.load(Ordering::SeqCst) == 0 && lock(&st.sessions).renewals_in_flight() == 0;
            if !crate::wait::until(QUIESCE, Duration::from_millis(5), quiet).await {
                warn!(pod = %conn.pod, "a request or renewal of this connection is still unanswered; the successor may see a stale handle (the message may be delivered twice)");
            }
            st.closed.store(true, Ordering::SeqCst);
            lock(&self.conns).remove(&conn.id);
            snap.client_id = lock(&st.client_id).clone();
            snap.groups = lock(&st.groups).values().map(|g| (g.consumer.clone(), g.decision == Decision::Convert)).collect();
            snap.sessions = lock(&st.sessions).clone();
            let held = snap.sessions.held();
            if held > 0 || answered > 0 {
                self.metrics.pop_n("handover_out", held as u64);
                info!(pod = %conn.pod, receipts = held, pulls_answered = answered, "handing this connection's Pull→Pop state to the new agent");
            }
        }
        let empty = snap.groups.is_empty() && snap.route_requests.is_empty() && snap.native.as_array().is_none_or(|a| a.is_empty());
        if empty {
            return None;
        }
        match serde_json::to_string(&snap) {
            Ok(s) => Some(s),
            Err(e) => {
                warn!(pod = %conn.pod, error = %e, "cannot encode a connection's Pull→Pop state; its messages come back after the invisible time");
                None
            }
        }
    }

    /// A connection the predecessor handed over, with its state.
    fn adopt_conn(&self, conn: &ConnHandle, state: &str) {
        let snap: ConnSnapshot = match serde_json::from_str(state) {
            Ok(s) => s,
            Err(e) => return warn!(pod = %conn.pod, error = %e, "the previous agent's state for this connection is unreadable; its messages come back after the invisible time"),
        };
        if let Some(n) = &self.native {
            n.adopt_conn(conn, snap.native);
        }
        {
            let mut pending = lock(&self.route_requests);
            for (o, t) in snap.route_requests {
                pending.insert((conn.id, o), t);
            }
        }
        if snap.groups.is_empty() {
            return;
        }
        let groups = snap
            .groups
            .into_iter()
            .map(|(consumer, convert)| {
                let decision = if convert { Decision::Convert } else { Decision::PassThrough("relayed unconverted by the previous agent") };
                (consumer.group_name.clone(), GroupState { consumer, decision })
            })
            .collect();
        let held = snap.sessions.held();
        let st = Arc::new(ConnState::new(conn.clone(), snap.client_id, groups, snap.sessions));
        lock(&self.conns).insert(conn.id, st);
        self.metrics.pop_n("handover_in", held as u64);
        info!(pod = %conn.pod, receipts = held, "adopted the previous agent's Pull→Pop state for this connection");
    }

    fn export_shared(&self) -> Option<String> {
        let snap = SharedSnapshot {
            broker_names: lock(&self.broker_names).iter().map(|(a, n)| (*a, n.clone())).collect(),
            routes: lock(&self.chooser).routes(),
            orderly: lock(&self.orderly).iter().cloned().collect(),
            batch_formats: lock(&self.batch_formats).iter().map(|(a, f)| (*a, *f)).collect(),
            ack_routes: self.native.as_ref().map(|n| n.export_routes()).unwrap_or_default(),
        };
        serde_json::to_string(&snap).ok()
    }

    fn adopt_shared(&self, state: &str) {
        let snap: SharedSnapshot = match serde_json::from_str(state) {
            Ok(s) => s,
            Err(e) => return warn!(error = %e, "the previous agent's shared Pop state is unreadable; routes are learned again"),
        };
        let ack_routes = snap.ack_routes.len();
        {
            let mut names = lock(&self.broker_names);
            for (a, n) in snap.broker_names {
                names.entry(a).or_insert(n);
            }
        }
        lock(&self.chooser).adopt(snap.routes);
        lock(&self.orderly).extend(snap.orderly);
        {
            let mut formats = lock(&self.batch_formats);
            for (a, f) in snap.batch_formats {
                formats.entry(a).or_insert(f);
            }
        }
        if let Some(n) = &self.native {
            n.adopt_routes(snap.ack_routes);
        }
        debug!(ack_routes, "adopted the previous agent's routes");
    }

    /// Waits (up to `limit`) for the work started for clients to finish: acknowledgements,
    /// releases, and POPs of PULLs answered at a hand-over (whose messages are released when
    /// they come back).
    pub async fn settle(&self, limit: Duration) {
        if !crate::wait::until(limit, Duration::from_millis(20), || self.tasks.load(Ordering::SeqCst) == 0).await {
            let left = self.tasks.load(Ordering::SeqCst);
            warn!(tasks = left, "exiting with broker requests unanswered; their messages come back after the invisible time");
        }
    }
}

async fn renew_loop(c: std::sync::Weak<Converter>) {
    loop {
        tokio::time::sleep(RENEW_EVERY).await;
        let Some(c) = c.upgrade() else { return };
        c.renew().await;
        debug!("renewal pass done");
    }
}

impl Interceptor for Converter {
    fn client_request(&self, conn: &ConnHandle, h: &Header) -> Verdict {
        if let Some(st) = self.existing(conn) {
            st.last_request_ms.store(now_ms(), Ordering::Relaxed);
        }
        if let Some(v) = self.native.as_ref().and_then(|n| n.client_request(conn, h)) {
            return v;
        }
        match h.code {
            // Nothing to decide when nothing is converted (ack routing alone).
            code::HEART_BEAT | code::LOCK_BATCH_MQ if self.cfg.policy == ConvertPolicy::None => Verdict::Forward,
            code::HEART_BEAT | code::LOCK_BATCH_MQ => Verdict::Inspect,
            code::GET_ROUTEINFO_BY_TOPIC => {
                // The answer does not name the topic; remember it for the chooser.
                if let Some(t) = h.ext("topic") {
                    let mut pending = lock(&self.route_requests);
                    if pending.len() < 65_536 {
                        pending.insert((conn.id, h.opaque), t.to_string());
                    }
                }
                Verdict::Forward
            }
            code::PULL_MESSAGE | code::QUERY_CONSUMER_OFFSET | code::UPDATE_CONSUMER_OFFSET | code::GET_CONSUMER_LIST_BY_GROUP => {
                match h.ext("consumerGroup") {
                    Some(g) if self.converted(conn, g) => Verdict::Take,
                    _ => Verdict::Forward,
                }
            }
            code::CONSUMER_SEND_MSG_BACK => match h.ext("group") {
                Some(g) if self.converted(conn, g) => Verdict::Take,
                _ => Verdict::Forward,
            },
            _ => Verdict::Forward,
        }
    }

    fn broker_request(&self, conn: &ConnHandle, h: &Header) -> Verdict {
        // Membership changes mean nothing when every client owns every queue.
        match (h.code, h.ext("consumerGroup")) {
            (code::NOTIFY_CONSUMER_IDS_CHANGED, Some(g)) if self.converted(conn, g) => Verdict::Drop,
            _ => Verdict::Forward,
        }
    }

    fn watch_response(&self, _conn: &ConnHandle, request_code: i32) -> Watch {
        match request_code {
            code::GET_ROUTEINFO_BY_TOPIC => Watch::Frame,
            c if self.native.is_some() && NativePop::watches(c) => Watch::Header,
            _ => Watch::Ignore,
        }
    }

    fn response_header(&self, conn: &ConnHandle, _request_code: i32, header: &Header) {
        if let Some(n) = &self.native {
            n.response_header(conn, header);
        }
    }

    fn taken(&self, conn: &ConnHandle, header: Header, frame: Vec<u8>) {
        let Some(me) = self.me.upgrade() else { return };
        let st = self.state(conn);
        // Registered before this returns, so that a hand-over, which starts only after the
        // relay paused, sees every taken request.
        if header.code == code::PULL_MESSAGE {
            let x = header.ext("queueOffset").and_then(|v| v.parse().ok()).unwrap_or(0);
            lock(&st.pulls).insert(header.opaque, PullInFlight { x, started: None });
            return self.spawn(me.handle(st, header, frame));
        }
        let busy = Tracked::new(&st.busy);
        if matches!(header.code, code::ACK_MESSAGE | code::CHANGE_MESSAGE_INVISIBLETIME | code::BATCH_ACK_MESSAGE) {
            let conn = conn.clone();
            return self.spawn(async move {
                if let Some(n) = &me.native {
                    n.taken(conn, header, frame, |a| me.broker_name(a)).await;
                }
                drop(busy);
            });
        }
        self.spawn(async move {
            me.handle(st, header, frame).await;
            drop(busy);
        });
    }

    fn inspected(&self, conn: &ConnHandle, header: Header, frame: Vec<u8>) {
        let Ok((h, body)) = decode_frame(&frame, &self.limits) else { return };
        let body = &frame[body];
        if h.is_response() {
            // Only route answers are inspected.
            let topic = lock(&self.route_requests).remove(&(conn.id, h.opaque));
            if h.code == 0 {
                self.on_route(topic, body);
            }
            return;
        }
        match (h.is_response(), header.code) {
            (false, code::HEART_BEAT) => self.on_heartbeat(conn, body),
            (false, code::LOCK_BATCH_MQ) => self.on_lock(body),
            _ => {}
        }
    }

    fn closed(&self, conn: &ConnHandle) {
        if let Some(n) = &self.native {
            n.closed(conn);
        }
        lock(&self.route_requests).retain(|(id, _), _| *id != conn.id);
        let Some(st) = lock(&self.conns).remove(&conn.id) else { return };
        st.closed.store(true, Ordering::Relaxed);
        // The client is gone: everything it held goes back to the others now,
        // not after the invisible time.
        let groups: Vec<String> = lock(&st.groups).keys().cloned().collect();
        for group in groups {
            let receipts = lock(&st.sessions).take_group(&group);
            self.release(&st, &group, receipts);
        }
    }

    fn export<'a>(&'a self, conn: &'a ConnHandle) -> std::pin::Pin<Box<dyn std::future::Future<Output = Option<String>> + Send + 'a>> {
        Box::pin(self.export_conn(conn))
    }

    fn adopt(&self, conn: &ConnHandle, state: &str) {
        self.adopt_conn(conn, state)
    }

    fn export_shared(&self) -> Option<String> {
        Converter::export_shared(self)
    }

    fn adopt_shared(&self, state: &str) {
        Converter::adopt_shared(self, state)
    }

    fn pins(&self, conn: &ConnHandle) -> bool {
        // Receipts live in this process; such a connection drains instead of moving.
        self.existing(conn).is_some_and(|st| lock(&st.groups).values().any(|g| g.decision == Decision::Convert))
    }
}

/// Delay before a nacked message comes back: the broker's delay levels
/// (1s 5s 10s 30s 1m 2m 3m 4m 5m 6m 7m 8m 9m 10m 20m 30m 1h 2h), level 0
/// meaning "3 + times already reconsumed", as a classic send-back does.
fn retry_delay(level: i32, reconsume_times: i32) -> Duration {
    const LEVELS_S: [u64; 18] = [1, 5, 10, 30, 60, 120, 180, 240, 300, 360, 420, 480, 540, 600, 1200, 1800, 3600, 7200];
    let level = if level <= 0 { 3 + reconsume_times } else { level };
    let i = (level.clamp(1, LEVELS_S.len() as i32) - 1) as usize;
    Duration::from_secs(LEVELS_S[i])
}

/// Where a receipt's requests go: the broker that served its pop.
fn served_by(st: &ConnState, r: &Receipt) -> SocketAddr {
    r.broker_addr.unwrap_or(st.handle.dst.0)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn converter() -> Arc<Converter> {
        use crate::socket::{CaptureMode, KernelSockets};
        let sockets = Arc::new(KernelSockets { mode: CaptureMode::Tproxy, mark: 0, keepalive: Duration::from_secs(30) });
        let brokers = Arc::new(BrokerClients::new(sockets, Limits::default(), Duration::from_secs(1)));
        let cfg = ConvertConfig {
            policy: ConvertPolicy::All,
            invisible: Duration::from_secs(60),
            release: Duration::from_secs(1),
            max_reconsume: None,
            retry_delay: None,
            ack_routing: true,
        };
        Converter::new(cfg, brokers, Arc::new(Metrics::new()), Limits::default())
    }

    fn receipt(q: i64) -> Receipt {
        Receipt {
            broker_name: "bk".into(),
            broker_addr: Some("10.0.0.1:10911".parse().unwrap()),
            topic: "T".into(),
            original_topic: "T".into(),
            queue_id: 0,
            queue_offset: q,
            extra_info: format!("{q} 1000 60000 0 0 bk 0 {q}"),
            commit_log_offset: q * 100,
            uniq_key: None,
            reconsume_times: 0,
            invisible_ms: 60_000,
            pop_time: now_ms() as i64,
            revive_qid: 0,
            retry_flag: "0".into(),
        }
    }

    /// A converted connection's receipts and groups move to the successor; a PULL still
    /// waiting on its POP is answered "no new message" at the offset the client asked for.
    #[tokio::test]
    async fn a_converted_connection_moves_with_its_receipts() {
        use crate::addr::{OrigDst, PodAddr};
        use crate::pop::heartbeat::{ConsumeFromWhere, ConsumeType, MessageModel};
        let (old, new) = (converter(), converter());
        let (pod, dst) = (PodAddr::new("10.200.1.2:5000".parse().unwrap()), OrigDst::new("10.0.0.1:10911".parse().unwrap()));
        let (conn, out) = ConnHandle::for_test(1, pod, dst);
        let consumer = ConsumerData {
            group_name: "g".into(),
            consume_type: ConsumeType::Passively,
            message_model: MessageModel::Clustering,
            consume_from_where: ConsumeFromWhere::LastOffset,
            subscriptions: Vec::new(),
        };
        let st = old.state(&conn);
        lock(&st.groups).insert("g".into(), GroupState { consumer, decision: Decision::Convert });
        let key = SessionKey::new("g", "T", 0);
        {
            let mut s = lock(&st.sessions);
            s.on_pull(&key, 100);
            let g = s.generation(&key).unwrap();
            s.assign(&key, g, 100, vec![receipt(1), receipt(2)]).unwrap();
            s.on_pull(&SessionKey::new("g", "T", 1), 7);
        }
        let g = lock(&st.sessions).generation(&SessionKey::new("g", "T", 1)).unwrap();
        lock(&st.pulls).insert(42, PullInFlight { x: 7, started: Some((SessionKey::new("g", "T", 1), g)) });
        lock(&old.broker_names).insert(dst.0, "bk".into());

        let shared = old.export_shared().unwrap();
        let state = old.export_conn(&conn).await.unwrap();
        assert!(st.closed.load(Ordering::SeqCst) && old.existing(&conn).is_none(), "the old agent lets go of the connection");
        let answer = out.client().try_pop().expect("the waiting PULL is answered");
        let (h, _) = decode_frame(&answer, &Limits::default()).unwrap();
        assert_eq!((h.code, h.opaque, h.ext("nextBeginOffset")), (code::PULL_NOT_FOUND, 42, Some("7")));

        new.adopt_shared(&shared);
        assert_eq!(new.broker_name(dst.0).as_deref(), Some("bk"));
        let (conn2, _) = ConnHandle::for_test(9, pod, dst);
        new.adopt_conn(&conn2, &state);
        assert!(new.converted(&conn2, "g"));
        assert_eq!(new.pending(), vec![("g".to_string(), "T".to_string(), 2)]);
        let st2 = new.existing(&conn2).unwrap();
        let acks = lock(&st2.sessions).on_commit(&key, 102);
        assert_eq!(acks.iter().map(|r| r.queue_offset).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(acks[0].broker_addr, Some(dst.0));
    }

    #[test]
    fn retry_delays_follow_the_broker_levels() {
        assert_eq!(retry_delay(0, 0), Duration::from_secs(10));
        assert_eq!(retry_delay(1, 5), Duration::from_secs(1));
        assert_eq!(retry_delay(99, 0), Duration::from_secs(7200));
    }
}
