//! Per-(connection, group, topic, virtual queue) Pull→Pop state (protocol.md §4.2).
//!
//! The client sees fabricated queue offsets: message i of the POP answering `PULL(queueOffset=X)`
//! gets X+i. Offsets come from the client's own request, never from an agent counter, so they
//! survive agent restarts. Rules that keep messages from being lost:
//! * a PULL at X releases every receipt at ≥ X (the client never saw them);
//! * a commit C ACKs only receipts below C that were not nacked; anything else is ignored;
//! * a POP answer for a superseded PULL is released, not assigned.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use super::receipt::Receipt;

/// A renewal unanswered this long is presumed lost and the receipt is offered again.
pub const STALE_RENEWAL_MS: i64 = 60_000;

/// One popped message the client holds at a fabricated offset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub receipt: Receipt,
    /// Handed back through CHANGE_INVISIBLETIME (client send-back); never ACKed by a commit.
    pub nacked: bool,
    /// The PULL response carrying it was written to the client (informational: a commit
    /// past an offset already proves delivery).
    pub delivered: bool,
    /// Since when (ms) a CHANGE_INVISIBLETIME renewal with this receipt is in flight.
    pub renewing: Option<i64>,
    /// Renewals sent and not yet answered (more than one only after [`STALE_RENEWAL_MS`]).
    pub renewals_in_flight: u32,
    /// The PULL generation that assigned it.
    pub generation: u64,
}

/// What to do with the handle a renewal returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Renewal {
    /// Stored in place of the old receipt; nothing to send.
    Stored,
    /// ACK this handle: the entry was committed (or nacked) while the renewal was in flight.
    Ack(Receipt),
    /// Release this handle: the entry was released (or is unknown) while the renewal was in flight.
    Release(Receipt),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum Disposition {
    Ack,
    Release,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct PullState {
    generation: u64,
    offset: i64,
    assigned: bool,
}

fn same_msg(a: &Receipt, b: &Receipt) -> bool {
    a.same_msg(b)
}

#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    entries: BTreeMap<i64, Entry>,
    generation: u64,
    pull: Option<PullState>,
    /// Receipts removed while their renewal was in flight, and what the renewed handle needs.
    limbo: Vec<(Receipt, Disposition)>,
}

impl Session {
    pub fn new() -> Self {
        Self::default()
    }

    /// A new PULL at `x`: returns the receipts to RELEASE (fabricated offset ≥ x, not nacked).
    /// Also supersedes any earlier PULL still waiting for its POP.
    pub fn on_pull(&mut self, x: i64) -> Vec<Receipt> {
        let g = self.generation + 1;
        self.on_pull_gen(x, g)
    }

    pub(crate) fn on_pull_gen(&mut self, x: i64, generation: u64) -> Vec<Receipt> {
        self.generation = generation;
        self.pull = Some(PullState { generation, offset: x, assigned: false });
        let above = self.entries.split_off(&x);
        self.dispose(above.into_values(), Disposition::Release)
    }

    /// The generation of the latest PULL; pass it back to [`Session::assign`].
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Gives `popped` the offsets x, x+1, … and returns the next offset (`nextBeginOffset`).
    /// `Err(popped)` — release them all — unless this is the first answer to the latest PULL
    /// (same generation and offset), i.e. the PULL was superseded, the session closed, or the
    /// offsets would overflow.
    pub fn assign(&mut self, generation: u64, x: i64, popped: Vec<Receipt>) -> Result<i64, Vec<Receipt>> {
        let current = matches!(self.pull, Some(p) if p.generation == generation && p.offset == x && !p.assigned);
        let Some(next) = i64::try_from(popped.len()).ok().and_then(|n| x.checked_add(n)) else {
            return Err(popped);
        };
        if !current {
            return Err(popped);
        }
        if let Some(p) = self.pull.as_mut() {
            p.assigned = true;
        }
        // on_pull(x) removed everything ≥ x and nothing was inserted since: no overwrite possible.
        for (off, receipt) in (x..next).zip(popped) {
            self.entries.insert(
                off,
                Entry { receipt, nacked: false, delivered: false, renewing: None, renewals_in_flight: 0, generation },
            );
        }
        Ok(next)
    }

    /// The PULL response of `generation` reached the client's socket.
    pub fn mark_delivered(&mut self, generation: u64) {
        for e in self.entries.values_mut().filter(|e| e.generation == generation) {
            e.delivered = true;
        }
    }

    /// Client commit C (UPDATE_CONSUMER_OFFSET or PULL commitOffset): returns the receipts to ACK
    /// (offset < C, not nacked) and forgets everything below C. Stale or unknown C: no-op.
    pub fn on_commit(&mut self, c: i64) -> Vec<Receipt> {
        let rest = self.entries.split_off(&c);
        let below = std::mem::replace(&mut self.entries, rest);
        self.dispose(below.into_values(), Disposition::Ack)
    }

    fn dispose(&mut self, gone: impl Iterator<Item = Entry>, d: Disposition) -> Vec<Receipt> {
        let mut out = Vec::new();
        for e in gone {
            // One record per unanswered renewal; a nacked entry's renewal CK is surplus: ACK it.
            let d = if e.nacked { Disposition::Ack } else { d };
            for _ in 0..e.renewals_in_flight {
                self.limbo.push((e.receipt.clone(), d));
            }
            if !e.nacked {
                out.push(e.receipt);
            }
        }
        out
    }

    /// Client send-back of a message: marks its entry nacked and returns the receipt for
    /// CHANGE_INVISIBLETIME (or DLQ + ACK). Matches by commitLogOffset (what the client sends as
    /// `offset`) and, if given, UNIQ_KEY (`originMsgId`), falling back to UNIQ_KEY alone.
    /// A repeated send-back of the same message returns the receipt again.
    pub fn nack(&mut self, commit_log_offset: i64, uniq_key: Option<&str>) -> Option<Receipt> {
        self.find(commit_log_offset, uniq_key).map(|off| {
            let e = self.entries.get_mut(&off).expect("found above");
            e.nacked = true;
            e.receipt.clone()
        })
    }

    fn find(&self, clo: i64, uniq: Option<&str>) -> Option<i64> {
        let score = |r: &Receipt| {
            let uniq_ok = match (uniq, r.uniq_key.as_deref()) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            };
            if r.commit_log_offset == clo && uniq_ok {
                2
            } else if uniq.is_some() && r.uniq_key.as_deref() == uniq {
                1
            } else {
                0
            }
        };
        // Best match; among equals prefer one not yet nacked, then the lowest offset.
        self.entries
            .iter()
            .map(|(off, e)| (score(&e.receipt), !e.nacked, std::cmp::Reverse(*off)))
            .filter(|(s, _, _)| *s > 0)
            .max()
            .map(|(_, _, std::cmp::Reverse(off))| off)
    }

    /// The PULL of `generation` will not be answered with a POP (its connection moved to
    /// another agent): a POP that answers it later is refused by `assign`, like a superseded one.
    pub fn abandon_pull(&mut self, generation: u64) {
        if self.pull.is_some_and(|p| p.generation == generation) {
            self.pull = None;
        }
    }

    /// Renewals sent and not answered yet (their answers would change a handle).
    pub fn renewals_in_flight(&self) -> usize {
        self.entries.values().map(|e| e.renewals_in_flight as usize).sum::<usize>() + self.limbo.len()
    }

    /// Connection closed / client unregistered: every receipt not nacked is to be released.
    /// An in-flight POP for this session will be refused by `assign`.
    pub fn take_all(&mut self) -> Vec<Receipt> {
        self.pull = None;
        let all = std::mem::take(&mut self.entries);
        self.dispose(all.into_values(), Disposition::Release)
    }

    /// Receipts whose invisibility ends within `margin_ms` of `now_ms`, with their offsets.
    /// They are marked in flight: answer each with [`Session::replace`] or
    /// [`Session::renewal_failed`]; one unanswered for [`STALE_RENEWAL_MS`] is offered again.
    /// Nacked entries are never renewed (their delay is the retry).
    pub fn due_for_renewal(&mut self, now_ms: i64, margin_ms: i64) -> Vec<(i64, Receipt)> {
        let limit = now_ms.saturating_add(margin_ms);
        let mut out = Vec::new();
        for (off, e) in self.entries.iter_mut() {
            let in_flight = e.renewing.is_some_and(|t| now_ms < t.saturating_add(STALE_RENEWAL_MS));
            if !e.nacked && !in_flight && e.receipt.visible_at_ms() <= limit {
                e.renewing = Some(now_ms);
                e.renewals_in_flight += 1;
                out.push((*off, e.receipt.clone()));
            }
        }
        out
    }

    /// A renewal succeeded with handle `new` (see [`super::receipt::renewed`]).
    pub fn replace(&mut self, offset: i64, new: Receipt) -> Renewal {
        if let Some(e) = self.entries.get_mut(&offset) {
            if same_msg(&e.receipt, &new) && e.renewals_in_flight > 0 {
                e.renewals_in_flight -= 1;
                if e.renewals_in_flight == 0 {
                    e.renewing = None;
                }
                if e.nacked {
                    return Renewal::Ack(new);
                }
                e.receipt = new;
                return Renewal::Stored;
            }
        }
        if let Some(i) = self.limbo.iter().position(|(r, _)| same_msg(r, &new)) {
            let (_, d) = self.limbo.swap_remove(i);
            return match d {
                Disposition::Ack => Renewal::Ack(new),
                Disposition::Release => Renewal::Release(new),
            };
        }
        // Unknown: releasing can't lose a message.
        Renewal::Release(new)
    }

    /// A renewal failed; the old handle (`sent`) stays valid.
    pub fn renewal_failed(&mut self, offset: i64, sent: &Receipt) {
        if let Some(e) = self.entries.get_mut(&offset) {
            if same_msg(&e.receipt, sent) && e.renewals_in_flight > 0 {
                e.renewals_in_flight -= 1;
                if e.renewals_in_flight == 0 {
                    e.renewing = None;
                }
                return;
            }
        }
        if let Some(i) = self.limbo.iter().position(|(r, _)| same_msg(r, sent)) {
            self.limbo.swap_remove(i);
        }
    }

    /// Receipts awaiting a commit (not nacked).
    pub fn pending(&self) -> usize {
        self.entries.values().filter(|e| !e.nacked).count()
    }

    /// Fabricated offset of the entry holding this message, if any.
    pub fn offset_of(&self, receipt: &Receipt) -> Option<i64> {
        self.entries.iter().find(|(_, e)| same_msg(&e.receipt, receipt)).map(|(o, _)| *o)
    }

    pub fn get(&self, offset: i64) -> Option<&Entry> {
        self.entries.get(&offset)
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.limbo.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SessionKey {
    pub group: String,
    pub topic: String,
    /// The virtual queue id the client pulls.
    pub queue_id: i32,
}

impl SessionKey {
    pub fn new(group: &str, topic: &str, queue_id: i32) -> Self {
        SessionKey { group: group.to_owned(), topic: topic.to_owned(), queue_id }
    }
}

/// All sessions of one client connection. Serializable: they move with the connection
/// when a new agent takes over.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sessions {
    #[serde(with = "as_pairs")]
    map: HashMap<SessionKey, Session>,
    /// Shared across sessions so a recreated session never reuses a generation.
    generation: u64,
}

impl Sessions {
    pub fn new() -> Self {
        Self::default()
    }

    /// See [`Session::on_pull`]: receipts to release.
    pub fn on_pull(&mut self, key: &SessionKey, x: i64) -> Vec<Receipt> {
        self.generation += 1;
        let g = self.generation;
        self.map.entry(key.clone()).or_default().on_pull_gen(x, g)
    }

    /// Generation of the latest PULL of this queue; pass it to [`Sessions::assign`].
    pub fn generation(&self, key: &SessionKey) -> Option<u64> {
        self.map.get(key).map(Session::generation)
    }

    /// See [`Session::assign`]; `Err(popped)` = release them.
    pub fn assign(&mut self, key: &SessionKey, generation: u64, x: i64, popped: Vec<Receipt>) -> Result<i64, Vec<Receipt>> {
        match self.map.get_mut(key) {
            Some(s) => s.assign(generation, x, popped),
            None => Err(popped),
        }
    }

    pub fn mark_delivered(&mut self, key: &SessionKey, generation: u64) {
        if let Some(s) = self.map.get_mut(key) {
            s.mark_delivered(generation);
        }
    }

    /// See [`Session::on_commit`]: receipts to ACK.
    pub fn on_commit(&mut self, key: &SessionKey, c: i64) -> Vec<Receipt> {
        self.map.get_mut(key).map(|s| s.on_commit(c)).unwrap_or_default()
    }

    /// CONSUMER_SEND_MSG_BACK names only the group: searches all its sessions, preferring a
    /// commitLogOffset match (agreeing with `originMsgId` when given) over a UNIQ_KEY-only one.
    pub fn nack(&mut self, group: &str, commit_log_offset: i64, uniq_key: Option<&str>) -> Option<(SessionKey, Receipt)> {
        let mut best: Option<(bool, SessionKey)> = None;
        for (k, s) in self.map.iter().filter(|(k, _)| k.group == group) {
            if let Some(off) = s.find(commit_log_offset, uniq_key) {
                let exact = s.entries.get(&off).is_some_and(|e| e.receipt.commit_log_offset == commit_log_offset);
                if best.as_ref().is_none_or(|(r, bk)| (exact && !*r) || (exact == *r && k < bk)) {
                    best = Some((exact, k.clone()));
                }
            }
        }
        let (_, k) = best?;
        let r = self.map.get_mut(&k)?.nack(commit_log_offset, uniq_key)?;
        Some((k, r))
    }

    /// Connection closed: everything to release.
    pub fn take_all(&mut self) -> Vec<Receipt> {
        let mut out = Vec::new();
        for s in self.map.values_mut() {
            out.extend(s.take_all());
        }
        self.map.retain(|_, s| !s.is_empty());
        out
    }

    /// UNREGISTER_CLIENT for one consumer group: its receipts to release.
    pub fn take_group(&mut self, group: &str) -> Vec<Receipt> {
        let mut out = Vec::new();
        for s in self.map.iter_mut().filter(|(k, _)| k.group == group).map(|(_, s)| s) {
            out.extend(s.take_all());
        }
        self.map.retain(|k, s| k.group != group || !s.is_empty());
        out
    }

    /// See [`Session::abandon_pull`].
    pub fn abandon_pull(&mut self, key: &SessionKey, generation: u64) {
        if let Some(s) = self.map.get_mut(key) {
            s.abandon_pull(generation);
        }
    }

    /// See [`Session::renewals_in_flight`], over every session.
    pub fn renewals_in_flight(&self) -> usize {
        self.map.values().map(Session::renewals_in_flight).sum()
    }

    /// Receipts held, over every session (not nacked).
    pub fn held(&self) -> usize {
        self.map.values().map(Session::pending).sum()
    }

    /// See [`Session::due_for_renewal`]: (session, fabricated offset, receipt to renew).
    pub fn due_for_renewal(&mut self, now_ms: i64, margin_ms: i64) -> Vec<(SessionKey, i64, Receipt)> {
        let mut out = Vec::new();
        for (k, s) in self.map.iter_mut() {
            out.extend(s.due_for_renewal(now_ms, margin_ms).into_iter().map(|(o, r)| (k.clone(), o, r)));
        }
        out
    }

    /// See [`Session::replace`] and [`Renewal`].
    pub fn replace(&mut self, key: &SessionKey, offset: i64, new: Receipt) -> Renewal {
        match self.map.get_mut(key) {
            Some(s) => s.replace(offset, new),
            None => Renewal::Release(new),
        }
    }

    pub fn renewal_failed(&mut self, key: &SessionKey, offset: i64, sent: &Receipt) {
        if let Some(s) = self.map.get_mut(key) {
            s.renewal_failed(offset, sent);
        }
    }

    pub fn get(&self, key: &SessionKey) -> Option<&Session> {
        self.map.get(key)
    }

    /// Receipts awaiting a commit for (group, topic), summed over virtual queues.
    pub fn pending(&self, group: &str, topic: &str) -> usize {
        self.map
            .iter()
            .filter(|(k, _)| k.group == group && k.topic == topic)
            .map(|(_, s)| s.pending())
            .sum()
    }

    /// (group, topic) → pending receipts, for status/metrics (sum over connections).
    pub fn pending_counts(&self) -> BTreeMap<(String, String), usize> {
        let mut m = BTreeMap::new();
        for (k, s) in &self.map {
            *m.entry((k.group.clone(), k.topic.clone())).or_insert(0) += s.pending();
        }
        m
    }
}

/// A map with struct keys as a JSON list of pairs (JSON object keys must be strings).
mod as_pairs {
    use std::collections::HashMap;
    use std::hash::Hash;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<K: Serialize, V: Serialize, S: Serializer>(m: &HashMap<K, V>, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(m.iter())
    }

    pub fn deserialize<'de, K, V, D>(d: D) -> Result<HashMap<K, V>, D::Error>
    where
        K: Deserialize<'de> + Eq + Hash,
        V: Deserialize<'de>,
        D: Deserializer<'de>,
    {
        Ok(Vec::<(K, V)>::deserialize(d)?.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rc(id: i64) -> Receipt {
        Receipt {
            broker_name: "bk".into(),
            broker_addr: None,
            topic: "T".into(),
            original_topic: "T".into(),
            queue_id: (id % 4) as i32,
            queue_offset: id,
            extra_info: format!("{id} 1000 60000 0 0 bk {} {id}", id % 4),
            commit_log_offset: id * 100,
            uniq_key: Some(format!("U{id}")),
            reconsume_times: 0,
            invisible_ms: 60_000,
            pop_time: 1000,
            revive_qid: 0,
            retry_flag: "0".into(),
        }
    }

    fn ids(v: &[Receipt]) -> Vec<i64> {
        v.iter().map(|r| r.queue_offset).collect()
    }

    fn pull_pop(s: &mut Session, x: i64, popped: &[i64]) -> (Vec<Receipt>, i64) {
        let rel = s.on_pull(x);
        let g = s.generation();
        let next = s.assign(g, x, popped.iter().map(|&i| rc(i)).collect()).unwrap();
        (rel, next)
    }

    #[test]
    fn offsets_come_from_the_pull() {
        let mut s = Session::new();
        let (rel, next) = pull_pop(&mut s, 100, &[1, 2, 3]);
        assert!(rel.is_empty());
        assert_eq!(next, 103);
        assert_eq!(s.get(100).unwrap().receipt.queue_offset, 1);
        assert_eq!(s.get(102).unwrap().receipt.queue_offset, 3);
        // Empty POP: next stays at x.
        let (_, next) = pull_pop(&mut s, 103, &[]);
        assert_eq!(next, 103);
    }

    #[test]
    fn repull_at_lower_or_equal_offset_releases() {
        let mut s = Session::new();
        pull_pop(&mut s, 0, &[1, 2, 3]); // 0,1,2
        pull_pop(&mut s, 3, &[4, 5]); // 3,4
        // Response for 3.. lost: client re-pulls at 3.
        let (rel, _) = pull_pop(&mut s, 3, &[6]);
        assert_eq!(ids(&rel), vec![4, 5]);
        // Lower: everything from 1 up.
        let rel = s.on_pull(1);
        assert_eq!(ids(&rel), vec![2, 3, 6]);
        assert_eq!(s.pending(), 1);
        // A commit past the released offsets must not ACK anything released.
        assert_eq!(ids(&s.on_commit(10)), vec![1]);
    }

    #[test]
    fn commit_semantics() {
        let mut s = Session::new();
        pull_pop(&mut s, 10, &[1, 2, 3]); // 10,11,12
        assert!(s.on_commit(5).is_empty()); // below every receipt
        assert_eq!(ids(&s.on_commit(12)), vec![1, 2]);
        assert!(s.on_commit(12).is_empty()); // idempotent
        assert!(s.on_commit(11).is_empty()); // stale
        assert_eq!(s.pending(), 1);
        assert_eq!(ids(&s.on_commit(1000)), vec![3]);
        assert!(s.on_commit(2000).is_empty()); // nothing there: ignored
    }

    #[test]
    fn nacked_are_never_acked_nor_released() {
        let mut s = Session::new();
        pull_pop(&mut s, 0, &[1, 2, 3]);
        assert_eq!(s.nack(200, Some("U2")).map(|r| r.queue_offset), Some(2));
        assert_eq!(s.nack(200, Some("U2")).map(|r| r.queue_offset), Some(2)); // retried RPC
        assert_eq!(s.nack(999, Some("U3")).map(|r| r.queue_offset), Some(3)); // uniq only
        assert_eq!(s.nack(100, Some("OTHER")), None); // collision on another broker's offset
        assert_eq!(s.nack(100, None).map(|r| r.queue_offset), Some(1));
        assert_eq!(s.pending(), 0);
        assert!(s.on_commit(2).is_empty());
        assert!(s.on_pull(0).is_empty());
        assert_eq!(s.nack(123, None), None);
    }

    #[test]
    fn superseded_pull_is_refused() {
        let mut s = Session::new();
        s.on_pull(5);
        let g1 = s.generation();
        s.on_pull(5); // client gave up and re-pulled while the POP was in flight
        let g2 = s.generation();
        assert_eq!(ids(&s.assign(g1, 5, vec![rc(1)]).unwrap_err()), vec![1]);
        assert_eq!(s.assign(g2, 5, vec![rc(2)]), Ok(6));
        assert_eq!(ids(&s.assign(g2, 5, vec![rc(3)]).unwrap_err()), vec![3]); // one answer only
        assert_eq!(s.assign(g2 + 1, 6, vec![rc(4)]).unwrap_err().len(), 1);
        s.on_pull(i64::MAX);
        let g = s.generation();
        assert_eq!(s.assign(g, i64::MAX, vec![rc(5)]).unwrap_err().len(), 1); // overflow
        s.on_pull(6);
        let g = s.generation();
        assert!(s.take_all().len() == 1);
        assert!(s.assign(g, 6, vec![rc(6)]).is_err()); // closed
    }

    #[test]
    fn renewal_replacement() {
        let mut s = Session::new();
        pull_pop(&mut s, 0, &[1, 2, 3, 4]);
        assert!(s.due_for_renewal(0, 1000).is_empty());
        let due = s.due_for_renewal(55_000, 10_000);
        assert_eq!(due.iter().map(|(o, _)| *o).collect::<Vec<_>>(), vec![0, 1, 2, 3]);
        assert!(s.due_for_renewal(55_000, 10_000).is_empty()); // in flight: not twice
        let newer = |r: &Receipt| Receipt { pop_time: 60_000, extra_info: format!("new {}", r.queue_offset), ..r.clone() };
        // 0: plain success → stored, later ACKed with the new handle.
        assert_eq!(s.replace(0, newer(&due[0].1)), Renewal::Stored);
        // offset 1: committed while in flight → old handle ACKed now, new handle ACKed on return.
        // offset 2: released by a re-pull while in flight → new handle released on return.
        // offset 3: nacked while in flight (then dropped by the re-pull) → its renewal CK is surplus → ACK.
        assert_eq!(s.nack(400, Some("U4")).map(|r| r.queue_offset), Some(4));
        let acked = s.on_commit(2);
        assert_eq!(acked.iter().map(|r| r.extra_info.as_str()).collect::<Vec<_>>(), vec!["new 1", "2 1000 60000 0 0 bk 2 2"]);
        assert_eq!(ids(&s.on_pull(2)), vec![3]);
        assert_eq!(s.replace(1, newer(&due[1].1)), Renewal::Ack(newer(&due[1].1)));
        assert_eq!(s.replace(2, newer(&due[2].1)), Renewal::Release(newer(&due[2].1)));
        assert_eq!(s.replace(3, newer(&due[3].1)), Renewal::Ack(newer(&due[3].1)));
        assert!(s.is_empty());
        // Unknown handle (and offset reused by another message) → release, never overwrite.
        pull_pop(&mut s, 2, &[9]);
        assert_eq!(s.replace(2, newer(&due[2].1)), Renewal::Release(newer(&due[2].1)));
        assert_eq!(s.get(2).unwrap().receipt, rc(9));
        // Failed renewal: entry renewable again, old handle kept.
        let due = s.due_for_renewal(100_000, 0);
        s.renewal_failed(due[0].0, &due[0].1);
        assert_eq!(s.due_for_renewal(100_000, 0).len(), 1);
        // Unanswered: offered again only once it is stale.
        assert!(s.due_for_renewal(100_000 + STALE_RENEWAL_MS - 1, 0).is_empty());
        assert_eq!(s.due_for_renewal(100_000 + STALE_RENEWAL_MS, 0).len(), 1);
    }

    #[test]
    fn nacked_during_renewal() {
        let mut s = Session::new();
        pull_pop(&mut s, 0, &[1]);
        let due = s.due_for_renewal(i64::MAX, 0);
        s.nack(100, None).unwrap();
        let n = Receipt { pop_time: 5, ..due[0].1.clone() };
        assert_eq!(s.replace(0, n.clone()), Renewal::Ack(n.clone()));
        // Nacked and committed while renewing: the renewal handle is still ACKed.
        let mut s = Session::new();
        pull_pop(&mut s, 0, &[1]);
        let due = s.due_for_renewal(i64::MAX, 0);
        s.nack(100, None).unwrap();
        assert!(s.on_commit(1).is_empty());
        assert_eq!(s.replace(0, n.clone()), Renewal::Ack(n));
        let _ = due;
    }

    /// What moves with a connection to a new agent comes back the same and behaves the same.
    #[test]
    fn sessions_survive_a_hand_over() {
        let mut all = Sessions::new();
        let (a, b) = (SessionKey::new("g", "T", 0), SessionKey::new("g", "%RETRY%g", 1));
        all.on_pull(&a, 10);
        let g = all.generation(&a).unwrap();
        all.assign(&a, g, 10, vec![rc(1), rc(2), rc(3)]).unwrap();
        all.nack("g", 200, Some("U2")).unwrap();
        all.on_pull(&b, 0);
        let pending_pull = all.generation(&b).unwrap();
        let json = serde_json::to_string(&all).unwrap();
        let mut moved: Sessions = serde_json::from_str(&json).unwrap();
        assert_eq!(moved, all);
        assert_eq!(moved.held(), 2);
        // The PULL still waiting for its POP was answered by the hand-over: a late POP is refused.
        moved.abandon_pull(&b, pending_pull);
        assert_eq!(moved.assign(&b, pending_pull, 0, vec![rc(9)]).unwrap_err().len(), 1);
        // The client commits through the new agent: the same receipts are ACKed, the nacked one is not.
        assert_eq!(ids(&moved.on_commit(&a, 13)), vec![1, 3]);
        // New PULL generations never reuse one the old agent handed out.
        moved.on_pull(&a, 13);
        assert!(moved.generation(&a).unwrap() > pending_pull);
        assert_eq!(moved.renewals_in_flight(), 0);
    }

    #[test]
    fn sessions_route_and_count() {
        let mut all = Sessions::new();
        let (a, b, c) = (SessionKey::new("g", "T", 0), SessionKey::new("g", "T", 1), SessionKey::new("h", "T", 0));
        for (k, x, ids) in [(&a, 0, vec![1, 2]), (&b, 7, vec![3]), (&c, 0, vec![4])] {
            all.on_pull(k, x);
            let g = all.generation(k).unwrap();
            all.assign(k, g, x, ids.into_iter().map(rc).collect()).unwrap();
        }
        assert_eq!(all.pending("g", "T"), 3);
        assert_eq!(all.pending_counts().get(&("h".into(), "T".into())), Some(&1));
        let (k, r) = all.nack("g", 300, Some("U3")).unwrap();
        assert_eq!((k, r.queue_offset), (b.clone(), 3));
        assert!(all.nack("h", 300, Some("U3")).is_none()); // other group
        assert_eq!(ids(&all.on_commit(&a, 1)), vec![1]);
        assert!(all.on_commit(&SessionKey::new("x", "T", 0), 9).is_empty());
        assert_eq!(ids(&all.take_group("h")), vec![4]);
        assert_eq!(all.pending("g", "T"), 1);
        // Generations are global: a session recreated after a close never matches an old one.
        let old = all.generation(&a).unwrap();
        assert_eq!(ids(&all.take_all()), vec![2]);
        assert!(all.pending_counts().is_empty());
        assert!(all.assign(&a, old, 0, vec![rc(9)]).is_err());
        all.on_pull(&a, 0);
        assert!(all.generation(&a).unwrap() > old);
        // Renewal through the container.
        let g = all.generation(&a).unwrap();
        all.assign(&a, g, 0, vec![rc(1)]).unwrap();
        let due = all.due_for_renewal(i64::MAX / 2, 0);
        let (k, off, old) = &due[0];
        let new = Receipt { pop_time: 7, ..old.clone() };
        assert_eq!(all.replace(k, *off, new.clone()), Renewal::Stored);
        assert_eq!(all.on_commit(&a, 1), vec![new]);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Pull(i64),
        Pop(usize, bool),
        Commit(i64),
        Nack(usize),
        RenewStart(bool),
        RenewFinish(usize, bool),
        Close,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0i64..40).prop_map(Op::Pull),
            3 => (0usize..5, any::<bool>()).prop_map(|(n, s)| Op::Pop(n, s)),
            3 => (0i64..50).prop_map(Op::Commit),
            1 => any::<usize>().prop_map(Op::Nack),
            1 => any::<bool>().prop_map(Op::RenewStart),
            2 => (any::<usize>(), any::<bool>()).prop_map(|(i, ok)| Op::RenewFinish(i, ok)),
            1 => Just(Op::Close),
        ]
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Fate {
        Acked,
        Released,
        Nacked,
    }

    proptest! {
        /// Every receipt ends exactly one of acked / released / nacked (or is still pending),
        /// and none is ACKed by a commit at or below its fabricated offset.
        #[test]
        fn every_receipt_has_one_fate(ops in proptest::collection::vec(op(), 1..80)) {
            let mut s = Session::new();
            let mut next_id = 1i64;
            let mut issued: Vec<i64> = Vec::new();
            let mut offset_of: HashMap<i64, i64> = HashMap::new();
            let mut fate: HashMap<i64, Fate> = HashMap::new();
            let mut inflight: Vec<(i64, Receipt)> = Vec::new();
            let mut last_pull: Option<(u64, i64)> = None;
            let mut stale: Option<(u64, i64)> = None;
            let mut now = 1_000_000i64;
            fn set(fate: &mut HashMap<i64, Fate>, id: i64, f: Fate) -> Result<(), TestCaseError> {
                match fate.insert(id, f) {
                    None => Ok(()),
                    Some(old) if old == f => Ok(()),
                    // The surplus CK of a renewal racing a nack gets ACKed: still "nacked".
                    Some(Fate::Nacked) if f == Fate::Acked => { fate.insert(id, Fate::Nacked); Ok(()) }
                    Some(old) => Err(TestCaseError::fail(format!("receipt {id}: {old:?} then {f:?}"))),
                }
            }
            for op in ops {
                match op {
                    Op::Pull(x) => {
                        stale = last_pull;
                        for r in s.on_pull(x) {
                            prop_assert!(offset_of[&r.queue_offset] >= x);
                            set(&mut fate, r.queue_offset, Fate::Released)?;
                        }
                        last_pull = Some((s.generation(), x));
                    }
                    Op::Pop(n, use_stale) => {
                        let target = if use_stale { stale } else { last_pull };
                        let Some((g, x)) = target else { continue };
                        let popped: Vec<Receipt> = (0..n).map(|i| rc(next_id + i as i64)).collect();
                        next_id += n as i64;
                        issued.extend(popped.iter().map(|r| r.queue_offset));
                        match s.assign(g, x, popped) {
                            Ok(next) => {
                                prop_assert_eq!(next, x + n as i64);
                                for (i, id) in (next_id - n as i64..next_id).enumerate() {
                                    offset_of.insert(id, x + i as i64);
                                }
                            }
                            Err(back) => for r in back {
                                set(&mut fate, r.queue_offset, Fate::Released)?;
                            },
                        }
                    }
                    Op::Commit(c) => for r in s.on_commit(c) {
                        prop_assert!(offset_of[&r.queue_offset] < c, "acked at/above the commit");
                        set(&mut fate, r.queue_offset, Fate::Acked)?;
                    },
                    Op::Nack(i) => {
                        if issued.is_empty() { continue; }
                        let id = issued[i % issued.len()];
                        if let Some(r) = s.nack(id * 100, Some(&format!("U{id}"))) {
                            prop_assert_eq!(r.queue_offset, id);
                            set(&mut fate, id, Fate::Nacked)?;
                        }
                    }
                    Op::RenewStart(later) => {
                        // Past the stale limit a second renewal of the same receipt goes out.
                        if later { now += STALE_RENEWAL_MS + 1; }
                        inflight.extend(s.due_for_renewal(now, 1 << 40));
                    }
                    Op::RenewFinish(i, ok) => {
                        if inflight.is_empty() { continue; }
                        let (off, r) = inflight.swap_remove(i % inflight.len());
                        if ok {
                            let n = Receipt { pop_time: r.pop_time + 1, ..r.clone() };
                            match s.replace(off, n) {
                                Renewal::Stored => {}
                                Renewal::Ack(n) => set(&mut fate, n.queue_offset, Fate::Acked)?,
                                Renewal::Release(n) => set(&mut fate, n.queue_offset, Fate::Released)?,
                            }
                        } else {
                            s.renewal_failed(off, &r);
                        }
                    }
                    Op::Close => {
                        for r in s.take_all() {
                            set(&mut fate, r.queue_offset, Fate::Released)?;
                        }
                    }
                }
            }
            // Still pending at the end: exactly the issued receipts without a fate.
            let pending: Vec<i64> = s.entries.values().filter(|e| !e.nacked).map(|e| e.receipt.queue_offset).collect();
            for id in &pending {
                prop_assert!(!fate.contains_key(id), "receipt {} pending but {:?}", id, fate[id]);
            }
            for id in &issued {
                prop_assert!(fate.contains_key(id) || pending.contains(id), "receipt {} lost", id);
            }
            for r in s.take_all() {
                set(&mut fate, r.queue_offset, Fate::Released)?;
            }
            for (off, r) in inflight {
                match s.replace(off, r.clone()) {
                    Renewal::Stored => prop_assert!(false, "entry survived take_all"),
                    Renewal::Ack(n) => set(&mut fate, n.queue_offset, Fate::Acked)?,
                    Renewal::Release(n) => set(&mut fate, n.queue_offset, Fate::Released)?,
                }
            }
            prop_assert!(issued.iter().all(|id| fate.contains_key(id)));
        }
    }
}
