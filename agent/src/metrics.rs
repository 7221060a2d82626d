//! Prometheus metrics. Families are created once; label values are small,
//! bounded sets (request code names, error kinds, results).
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub code: &'static str,
    pub dir: &'static str,
    /// Empty when the request names no topic or group.
    pub topic: String,
    pub group: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    pub code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FrameErrorLabels {
    pub kind: &'static str,
    pub side: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindResultLabels {
    pub kind: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirLabel {
    pub dir: &'static str,
}

pub struct Metrics {
    pub connections: Family<ResultLabel, Counter>,
    pub connections_active: Gauge,
    pub requests: Family<RequestLabels, Counter>,
    pub frame_errors: Family<FrameErrorLabels, Counter>,
    pub bytes: Family<DirLabel, Counter<u64, AtomicU64>>,
    pub latency: Family<CodeLabel, Histogram>,
    /// Pull→Pop: decisions, agent requests by kind, messages delivered, receipts held.
    pub conversions: Family<ResultLabel, Counter>,
    pub pop_requests: Family<KindLabel, Counter>,
    pub pop_messages: Counter,
    pub pending_receipts: Gauge,
    /// Pop-native clients: acknowledgements by routing result, and the routing table size.
    pub pop_native_acks: Family<KindResultLabels, Counter>,
    pub pop_ack_routes: Gauge,
    registry: Registry,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("rmq_agent");
        let connections = Family::<ResultLabel, Counter>::default();
        let connections_active = Gauge::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let frame_errors = Family::<FrameErrorLabels, Counter>::default();
        let bytes = Family::<DirLabel, Counter<u64, AtomicU64>>::default();
        // 50 µs .. ~1.6 s (long-poll PULLs land in +Inf, as they should).
        let latency = Family::<CodeLabel, Histogram>::new_with_constructor(|| Histogram::new(exponential_buckets(0.00005, 2.0, 16)));
        registry.register("connections", "Captured connections by outcome", connections.clone());
        registry.register("connections_active", "Proxied connections open now", connections_active.clone());
        registry.register("requests", "Relayed RocketMQ requests by code and initiator", requests.clone());
        registry.register("frame_errors", "Connections closed for a malformed frame", frame_errors.clone());
        registry.register("bytes", "Bytes relayed (up = pod to broker)", bytes.clone());
        registry.register("request_duration_seconds", "Request to response time through the agent, by request code", latency.clone());
        let conversions = Family::<ResultLabel, Counter>::default();
        let pop_requests = Family::<KindLabel, Counter>::default();
        let pop_messages = Counter::default();
        let pending_receipts = Gauge::default();
        registry.register("pop_conversion_decisions", "Consumer groups converted to POP or relayed unconverted", conversions.clone());
        registry.register("pop_requests", "Requests the agent sent for converted groups (pop, ack = messages acknowledged by ACK_MESSAGE or in a batch_ack, batch_ack, change_invisible, renew, dlq), POPs served by another broker than the client addressed (pop_elsewhere, pop_failover), POP responses of Pop-native clients recorded for ack routing (native_pop), and receipts moved at a hand-over (handover_out, handover_in)", pop_requests.clone());
        registry.register("pop_messages", "Messages delivered to classic consumers through POP", pop_messages.clone());
        registry.register("pop_pending_receipts", "Popped messages not yet acknowledged", pending_receipts.clone());
        let pop_native_acks = Family::<KindResultLabels, Counter>::default();
        let pop_ack_routes = Gauge::default();
        registry.register(
            "pop_native_acks",
            "Messages acknowledged (ack) or given a new invisible time (change_invisible) by Pop-native clients, by where they went: \
             direct (their connection leads to the broker that served the pop), rerouted (sent there by the agent), unknown (no route known; relayed as sent), reroute_failed",
            pop_native_acks.clone(),
        );
        registry.register("pop_ack_routes", "Pops of Pop-native clients whose serving broker the agent remembers", pop_ack_routes.clone());
        Metrics {
            connections,
            connections_active,
            requests,
            frame_errors,
            bytes,
            latency,
            conversions,
            pop_requests,
            pop_messages,
            pending_receipts,
            pop_native_acks,
            pop_ack_routes,
            registry,
        }
    }

    pub fn connection(&self, result: &'static str) {
        self.connections.get_or_create(&ResultLabel { result }).inc();
    }

    pub fn request(&self, code: &'static str, dir: &'static str, topic: &str, group: &str) {
        let labels = RequestLabels { code, dir, topic: topic.to_string(), group: group.to_string() };
        self.requests.get_or_create(&labels).inc();
    }

    pub fn conversion_decision(&self, converted: bool) {
        let result = if converted { "converted" } else { "pass_through" };
        self.conversions.get_or_create(&ResultLabel { result }).inc();
    }

    pub fn pop(&self, kind: &'static str) {
        self.pop_requests.get_or_create(&KindLabel { kind }).inc();
    }

    pub fn pop_n(&self, kind: &'static str, n: u64) {
        self.pop_requests.get_or_create(&KindLabel { kind }).inc_by(n);
    }

    pub fn pop_native_ack(&self, kind: &'static str, result: &'static str, n: u64) {
        if n > 0 {
            self.pop_native_acks.get_or_create(&KindResultLabels { kind, result }).inc_by(n);
        }
    }

    pub fn pop_messages(&self, n: u64) {
        self.pop_messages.inc_by(n);
    }

    pub fn latency(&self, code: &'static str, d: std::time::Duration) {
        self.latency.get_or_create(&CodeLabel { code }).observe(d.as_secs_f64());
    }

    pub fn frame_error(&self, kind: &'static str, side: &'static str) {
        self.frame_errors.get_or_create(&FrameErrorLabels { kind, side }).inc();
    }

    pub fn add_bytes(&self, dir: &'static str, n: u64) {
        if n > 0 {
            self.bytes.get_or_create(&DirLabel { dir }).inc_by(n);
        }
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

