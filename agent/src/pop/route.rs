//! Topic routes as the name server gives them, and the choice of broker for a converted PULL's
//! POP. POP with queueId -1 reaches every real queue of the broker it is sent to, so any readable
//! broker of the topic can serve any PULL (protocol.md §4.2 item 5): the agent picks the one with
//! the fewest POPs in flight, skipping brokers that just failed, and prefers the broker the
//! client addressed when it is as good as any. Consumption then goes on when a broker hangs or
//! refuses, and long-polls spread over the brokers that have messages.

use std::collections::HashMap;
use std::net::SocketAddr;

/// PermName.PERM_READ.
const PERM_READ: i64 = 4;

/// One broker of a topic's route (its master, brokerId 0).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RouteBroker {
    pub name: String,
    pub addr: SocketAddr,
    /// The topic has readable queues there.
    pub readable: bool,
}

/// What a TopicRouteData body says: every broker address with its name (VIP ports included,
/// for naming only), and the topic's masters with their readability.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Route {
    pub names: Vec<(SocketAddr, String)>,
    pub masters: Vec<RouteBroker>,
}

/// Parses a TopicRouteData body (fastjson may leave numeric map keys unquoted).
pub fn parse_route(body: &[u8]) -> Route {
    let text = String::from_utf8_lossy(body);
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&quote_numeric_keys(&text)) else { return Route::default() };
    let mut readable: HashMap<&str, bool> = HashMap::new();
    for qd in v.get("queueDatas").and_then(|q| q.as_array()).into_iter().flatten() {
        let Some(name) = qd.get("brokerName").and_then(|n| n.as_str()) else { continue };
        let perm = qd.get("perm").and_then(|p| p.as_i64()).unwrap_or(0);
        let queues = qd.get("readQueueNums").and_then(|p| p.as_i64()).unwrap_or(0);
        *readable.entry(name).or_default() |= perm & PERM_READ != 0 && queues > 0;
    }
    let mut route = Route::default();
    for bd in v.get("brokerDatas").and_then(|b| b.as_array()).into_iter().flatten() {
        let Some(name) = bd.get("brokerName").and_then(|n| n.as_str()) else { continue };
        for (id, addr) in bd.get("brokerAddrs").and_then(|a| a.as_object()).into_iter().flatten() {
            let Some(a) = addr.as_str().and_then(|a| a.parse::<SocketAddr>().ok()) else { continue };
            route.names.push((a, name.to_string()));
            // Old SDKs use the VIP channel (port - 2) for the same broker.
            route.names.push((SocketAddr::new(a.ip(), a.port().saturating_sub(2)), name.to_string()));
            if id == "0" {
                route.masters.push(RouteBroker { name: name.to_string(), addr: a, readable: readable.get(name).copied().unwrap_or(false) });
            }
        }
    }
    route
}

/// Quotes bare numeric object keys (`{0:"a"}` → `{"0":"a"}`), outside strings.
pub fn quote_numeric_keys(s: &str) -> String {
    let b = s.as_bytes();
    let mut out: Vec<u8> = Vec::with_capacity(b.len() + 16);
    let mut i = 0;
    let mut in_str = false;
    while i < b.len() {
        let c = b[i];
        if in_str {
            out.push(c);
            if c == b'\\' && i + 1 < b.len() {
                out.push(b[i + 1]);
                i += 1;
            } else if c == b'"' {
                in_str = false;
            }
        } else if c == b'"' {
            in_str = true;
            out.push(c);
        } else if (c == b'{' || c == b',') && i + 1 < b.len() && (b[i + 1].is_ascii_digit() || b[i + 1] == b'-') {
            let mut j = i + 1;
            while j < b.len() && (b[j].is_ascii_digit() || b[j] == b'-') {
                j += 1;
            }
            out.push(c);
            if j < b.len() && b[j] == b':' {
                out.push(b'"');
                out.extend_from_slice(&b[i + 1..j]);
                out.push(b'"');
                i = j;
                continue;
            }
        } else {
            out.push(c);
        }
        i += 1;
    }
    // Only ASCII was inserted, at ASCII positions: still valid UTF-8.
    String::from_utf8(out).unwrap_or_default()
}

/// A broker of a route, whether it is marked down, and its POPs in flight.
pub type BrokerState = (RouteBroker, bool, u32);

/// Picks the broker for each POP of converted groups.
#[derive(Debug, Default)]
pub struct Chooser {
    topics: HashMap<String, Vec<RouteBroker>>,
    /// Brokers that failed a request, skipped until then (agent clock, ms).
    down_until: HashMap<SocketAddr, u64>,
    inflight: HashMap<SocketAddr, u32>,
    cursor: usize,
}

impl Chooser {
    pub fn new() -> Self {
        Self::default()
    }

    /// The topic's latest route (masters only).
    pub fn learn(&mut self, topic: &str, masters: Vec<RouteBroker>) {
        if !masters.is_empty() {
            self.topics.insert(topic.to_string(), masters);
        }
    }

    /// Every learned route, for a successor agent.
    pub fn routes(&self) -> Vec<(String, Vec<RouteBroker>)> {
        self.topics.iter().map(|(t, b)| (t.clone(), b.clone())).collect()
    }

    /// Routes a predecessor learned, for topics this agent has not seen yet (its own are newer).
    pub fn adopt(&mut self, routes: Vec<(String, Vec<RouteBroker>)>) {
        for (t, b) in routes {
            if !self.topics.contains_key(&t) {
                self.learn(&t, b);
            }
        }
    }

    /// Readable brokers of `topic` that are not marked down.
    fn candidates(&self, topic: &str, now_ms: u64) -> Vec<&RouteBroker> {
        let up = |a: &SocketAddr| self.down_until.get(a).is_none_or(|&t| t <= now_ms);
        self.topics.get(topic).into_iter().flatten().filter(|b| b.readable && up(&b.addr)).collect()
    }

    /// Where to POP for a PULL that arrived on a connection to `preferred`: the least loaded
    /// candidate, `preferred` when it ties, else round-robin among the ties. With no
    /// candidate known (no route seen, or all down) it is `preferred`.
    pub fn pick(&mut self, topic: &str, preferred: SocketAddr, now_ms: u64) -> SocketAddr {
        let load = |a: &SocketAddr| self.inflight.get(a).copied().unwrap_or(0);
        let cands = self.candidates(topic, now_ms);
        let Some(min) = cands.iter().map(|b| load(&b.addr)).min() else { return preferred };
        if cands.iter().any(|b| b.addr == preferred) && load(&preferred) <= min {
            return preferred;
        }
        let ties: Vec<SocketAddr> = cands.iter().filter(|b| load(&b.addr) == min).map(|b| b.addr).collect();
        self.cursor = self.cursor.wrapping_add(1);
        ties[self.cursor % ties.len()]
    }

    /// Another broker than those already `tried` for a PULL whose POP failed, if any.
    pub fn another(&mut self, topic: &str, tried: &[SocketAddr], now_ms: u64) -> Option<SocketAddr> {
        let load = |a: &SocketAddr| self.inflight.get(a).copied().unwrap_or(0);
        self.candidates(topic, now_ms).into_iter().filter(|b| !tried.contains(&b.addr)).min_by_key(|b| load(&b.addr)).map(|b| b.addr)
    }

    pub fn started(&mut self, addr: SocketAddr) {
        *self.inflight.entry(addr).or_default() += 1;
    }

    pub fn finished(&mut self, addr: SocketAddr) {
        if let Some(n) = self.inflight.get_mut(&addr) {
            *n = n.saturating_sub(1);
        }
    }

    /// `addr` failed (no connection, no answer): skip it for `for_ms`.
    pub fn mark_down(&mut self, addr: SocketAddr, now_ms: u64, for_ms: u64) {
        self.down_until.insert(addr, now_ms.saturating_add(for_ms));
    }

    /// `addr` answered: use it again at once.
    pub fn mark_up(&mut self, addr: SocketAddr) {
        self.down_until.remove(&addr);
    }

    pub fn is_down(&self, addr: SocketAddr, now_ms: u64) -> bool {
        self.down_until.get(&addr).is_some_and(|&t| t > now_ms)
    }

    /// Every known topic's brokers with their state, sorted by topic (for the state dump).
    pub fn snapshot(&self, now_ms: u64) -> Vec<(String, Vec<BrokerState>)> {
        let mut out: Vec<_> = self
            .topics
            .iter()
            .map(|(t, bs)| {
                let brokers = bs.iter().map(|b| (b.clone(), self.is_down(b.addr, now_ms), self.inflight.get(&b.addr).copied().unwrap_or(0))).collect();
                (t.clone(), brokers)
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn two() -> Chooser {
        let mut c = Chooser::new();
        c.learn(
            "T",
            vec![
                RouteBroker { name: "a".into(), addr: a("10.0.0.1:10911"), readable: true },
                RouteBroker { name: "b".into(), addr: a("10.0.0.2:10911"), readable: true },
            ],
        );
        c
    }

    #[test]
    fn route_bodies_name_brokers_and_their_readability() {
        let body = br#"{"brokerDatas":[{"brokerName":"broker-a","brokerAddrs":{0:"10.200.2.2:10911",1:"10.200.2.9:10911"},"cluster":"c"},
            {"brokerName":"broker-b","brokerAddrs":{"0":"[fd00::2]:10911"}}],
            "queueDatas":[{"brokerName":"broker-a","perm":6,"readQueueNums":2,"writeQueueNums":2},{"brokerName":"broker-b","perm":2,"readQueueNums":2}]}"#;
        let r = parse_route(body);
        assert!(r.names.contains(&(a("10.200.2.2:10911"), "broker-a".into())));
        assert!(r.names.contains(&(a("10.200.2.2:10909"), "broker-a".into())));
        assert!(r.names.contains(&(a("10.200.2.9:10911"), "broker-a".into())));
        assert_eq!(
            r.masters,
            vec![
                RouteBroker { name: "broker-a".into(), addr: a("10.200.2.2:10911"), readable: true },
                RouteBroker { name: "broker-b".into(), addr: a("[fd00::2]:10911"), readable: false },
            ]
        );
        assert_eq!(parse_route(b"{\"brokerDatas\":"), Route::default());
    }

    #[test]
    fn numeric_keys_are_quoted_outside_strings_only() {
        assert_eq!(quote_numeric_keys(r#"{0:"a",1:"b"}"#), r#"{"0":"a","1":"b"}"#);
        assert_eq!(quote_numeric_keys(r#"{"x":"{0:1}","é":{-1:2}}"#), r#"{"x":"{0:1}","é":{"-1":2}}"#);
    }

    #[test]
    fn the_addressed_broker_serves_while_it_is_as_good_as_any() {
        let mut c = two();
        let (x, y) = (a("10.0.0.1:10911"), a("10.0.0.2:10911"));
        assert_eq!(c.pick("T", x, 0), x);
        assert_eq!(c.pick("T", y, 0), y);
        // x is busier: its next PULL goes to y.
        c.started(x);
        assert_eq!(c.pick("T", x, 0), y);
        c.finished(x);
        assert_eq!(c.pick("T", x, 0), x);
        // Unknown topic or a broker outside the route: whatever the client addressed.
        assert_eq!(c.pick("U", x, 0), x);
        let z = a("10.0.0.3:10911");
        assert_eq!(c.pick("U", z, 0), z);
    }

    #[test]
    fn a_down_broker_is_skipped_until_its_time_is_up() {
        let mut c = two();
        let (x, y) = (a("10.0.0.1:10911"), a("10.0.0.2:10911"));
        c.mark_down(y, 1000, 10_000);
        assert!(c.is_down(y, 5000));
        for _ in 0..5 {
            assert_eq!(c.pick("T", y, 5000), x);
        }
        assert_eq!(c.another("T", &[y], 5000), Some(x));
        assert_eq!(c.another("T", &[x], 5000), None);
        // All down: nothing better than the addressed one.
        c.mark_down(x, 1000, 10_000);
        assert_eq!(c.pick("T", y, 5000), y);
        assert_eq!(c.pick("T", y, 11_000), y);
        c.mark_up(x);
        assert_eq!(c.pick("T", y, 6000), x);
    }

    #[test]
    fn unreadable_brokers_never_serve_and_ties_rotate() {
        let mut c = Chooser::new();
        let (x, y, z) = (a("10.0.0.1:1"), a("10.0.0.2:1"), a("10.0.0.3:1"));
        c.learn(
            "T",
            vec![
                RouteBroker { name: "a".into(), addr: x, readable: true },
                RouteBroker { name: "b".into(), addr: y, readable: true },
                RouteBroker { name: "c".into(), addr: z, readable: false },
            ],
        );
        // A PULL on the unreadable broker's connection rotates over the readable ones.
        let picks: Vec<SocketAddr> = (0..4).map(|_| c.pick("T", z, 0)).collect();
        assert!(picks.contains(&x) && picks.contains(&y) && !picks.contains(&z), "{picks:?}");
        // Least loaded wins over rotation.
        c.started(x);
        assert!((0..4).all(|_| c.pick("T", z, 0) == y));
        // An empty route does not replace a known one.
        c.learn("T", Vec::new());
        assert_eq!(c.pick("T", z, 0), y);
    }
}
