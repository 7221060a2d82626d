//! What the agent is doing right now, for the admin state dump and
//! `rmq-agent status`: listeners and every live proxied connection.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::addr::{OrigDst, PodAddr};

/// Client groups remembered per connection; more are counted, not stored.
const MAX_GROUPS_PER_CONN: usize = 16;

#[derive(Default)]
pub struct Registry {
    next_id: AtomicU64,
    conns: Mutex<HashMap<u64, Arc<ConnStats>>>,
}

pub struct ConnStats {
    pub pod: PodAddr,
    pub dst: OrigDst,
    opened_ms: u64,
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
    requests: Mutex<BTreeMap<&'static str, u64>>,
    client: Mutex<Option<(String, i32)>>,
    groups: Mutex<BTreeSet<String>>,
}

impl ConnStats {
    pub fn request(&self, code_name: &'static str) {
        *lock(&self.requests).entry(code_name).or_default() += 1;
    }

    /// The SDK's language and version, from its first request.
    pub fn client(&self, language: &str, version: i32) {
        let mut c = lock(&self.client);
        if c.is_none() {
            *c = Some((language.to_string(), version));
        }
    }

    pub fn group(&self, group: &str) {
        let mut g = lock(&self.groups);
        if g.len() < MAX_GROUPS_PER_CONN && !g.contains(group) {
            g.insert(group.to_string());
        }
    }
}

/// What `status` shows of a connection, carried to a successor agent.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ConnHistory {
    pub opened_unix_ms: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub requests: Vec<(String, u64)>,
    pub client: Option<(String, i32)>,
    pub groups: Vec<String>,
}

impl ConnStats {
    pub fn history(&self) -> ConnHistory {
        ConnHistory {
            opened_unix_ms: self.opened_ms,
            bytes_up: self.bytes_up.load(Ordering::Relaxed),
            bytes_down: self.bytes_down.load(Ordering::Relaxed),
            requests: lock(&self.requests).iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            client: lock(&self.client).clone(),
            groups: lock(&self.groups).iter().cloned().collect(),
        }
    }
}

/// Request counts are keyed by the code's static name; unknown names share one key.
fn static_code_name(name: &str) -> &'static str {
    crate::codec::code::REQUEST_CODES.iter().find(|(_, n)| *n == name).map_or("UNKNOWN", |(_, n)| n)
}

/// Removes the connection from the registry when the relay ends, however it ends.
pub struct Registration {
    registry: Arc<Registry>,
    id: u64,
    pub stats: Arc<ConnStats>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        lock(&self.registry.conns).remove(&self.id);
    }
}

impl Registry {
    /// `history`: what a predecessor agent had counted for this connection.
    pub fn register(self: &Arc<Self>, pod: PodAddr, dst: OrigDst, history: Option<ConnHistory>) -> Registration {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let h = history.unwrap_or_else(|| ConnHistory { opened_unix_ms: now_ms(), ..Default::default() });
        let mut requests: BTreeMap<&'static str, u64> = BTreeMap::new();
        for (name, n) in h.requests {
            *requests.entry(static_code_name(&name)).or_default() += n;
        }
        let mut groups: BTreeSet<String> = h.groups.into_iter().collect();
        while groups.len() > MAX_GROUPS_PER_CONN {
            groups.pop_last();
        }
        let stats = Arc::new(ConnStats {
            pod,
            dst,
            opened_ms: h.opened_unix_ms,
            bytes_up: AtomicU64::new(h.bytes_up),
            bytes_down: AtomicU64::new(h.bytes_down),
            requests: Mutex::new(requests),
            client: Mutex::new(h.client),
            groups: Mutex::new(groups),
        });
        lock(&self.conns).insert(id, stats.clone());
        Registration { registry: self.clone(), id, stats }
    }

    pub fn connections(&self) -> Vec<ConnectionView> {
        let conns: Vec<Arc<ConnStats>> = lock(&self.conns).values().cloned().collect();
        let mut out: Vec<ConnectionView> = conns
            .iter()
            .map(|c| {
                let client = lock(&c.client).clone();
                ConnectionView {
                    pod: c.pod.to_string(),
                    orig_dst: c.dst.to_string(),
                    opened_unix_ms: c.opened_ms,
                    bytes_up: c.bytes_up.load(Ordering::Relaxed),
                    bytes_down: c.bytes_down.load(Ordering::Relaxed),
                    requests: lock(&c.requests).iter().map(|(k, v)| (k.to_string(), *v)).collect(),
                    client_language: client.as_ref().map(|c| c.0.clone()),
                    client_version: client.map(|c| c.1),
                    groups: lock(&c.groups).iter().cloned().collect(),
                }
            })
            .collect();
        out.sort_by(|a, b| (&a.pod, &a.orig_dst).cmp(&(&b.pod, &b.orig_dst)));
        out
    }
}

/// The state dump served on the admin socket (`GET /state`) and read by `rmq-agent status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StateDump {
    pub pid: u32,
    pub version: String,
    /// How many agents ran before this one on the node (hand-overs).
    pub generation: u64,
    pub started_unix_ms: u64,
    pub now_unix_ms: u64,
    pub ready: bool,
    pub draining: bool,
    pub listeners: Vec<ListenerView>,
    pub connections: Vec<ConnectionView>,
    /// Pull→Pop conversion state; empty until conversion is enabled.
    pub converted_groups: Vec<ConvertedGroupView>,
    /// Pops of Pop-native clients whose serving broker is remembered for ack routing.
    #[serde(default)]
    pub pop_ack_routes: u64,
    /// Topic routes learned from name-server answers relayed to pods (the brokers a
    /// converted PULL may be served from).
    #[serde(default)]
    pub routes: Vec<RouteView>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RouteView {
    pub topic: String,
    pub brokers: Vec<RouteBrokerView>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RouteBrokerView {
    pub name: String,
    pub addr: String,
    pub readable: bool,
    /// Passed over after a failed POP, until it is retried.
    pub down: bool,
    pub pops_in_flight: u32,
}

/// What the Pop side adds to the dump.
#[derive(Debug, Clone, Default)]
pub struct PopState {
    pub groups: Vec<ConvertedGroupView>,
    pub ack_routes: u64,
    pub routes: Vec<RouteView>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ListenerView {
    pub addr: String,
    pub capture: String,
    pub transparent: bool,
    pub inherited: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnectionView {
    pub pod: String,
    pub orig_dst: String,
    pub opened_unix_ms: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub requests: BTreeMap<String, u64>,
    pub client_language: Option<String>,
    pub client_version: Option<i32>,
    pub groups: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConvertedGroupView {
    pub group: String,
    pub topic: String,
    pub pending_receipts: u64,
}

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
