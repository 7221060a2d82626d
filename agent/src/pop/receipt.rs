//! Receipt handles: building them from a POP response the way the Java client does
//! (`MQClientAPIImpl.processPopResponse`, protocol.md §3.2) and renewing them (§3.3).

use std::collections::HashMap;

use crate::codec::code::{response_code_name, SUCCESS};
use crate::codec::header::Header;

use super::batch::{parse_batch, StoredMsg};
use super::error::PopError;

pub const RETRY_PREFIX: &str = "%RETRY%";

/// Everything needed to ACK / CHANGE_INVISIBLETIME / dead-letter one popped message.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Receipt {
    pub broker_name: String,
    /// The address that served the pop; ACK, CHANGE_INVISIBLETIME and DLQ moves go there.
    /// None until the caller that sent the POP records it.
    pub broker_addr: Option<std::net::SocketAddr>,
    /// The topic it was popped from as the agent asked for it (`%RETRY%group` included), or the
    /// actual retry topic if the body names one. Revived messages (retry_flag "1"/"2") popped
    /// via a normal topic were really taken from the pop-retry topic: see [`Receipt::ack_topic`].
    pub topic: String,
    /// The topic the agent popped (= the client's PULL topic); BatchAck `t`.
    pub original_topic: String,
    /// Real queue and offset in `topic` (ACK header queueId/offset).
    pub queue_id: i32,
    pub queue_offset: i64,
    /// The handle for ACK/CIT.
    pub extra_info: String,
    pub commit_log_offset: i64,
    pub uniq_key: Option<String>,
    pub reconsume_times: i32,
    pub invisible_ms: i64,
    pub pop_time: i64,
    pub revive_qid: i32,
    /// "0" normal, "1" retry V1 / `%RETRY%` topic, "2" retry V2.
    pub retry_flag: String,
}

impl Receipt {
    /// ACK/CIT header topic: Java's `getRealTopic`, except that a `%RETRY%` topic is used as is
    /// (a direct pop of `%RETRY%group` would otherwise become `%RETRY%group_%RETRY%group`).
    pub fn ack_topic(&self, group: &str) -> String {
        real_topic(&self.topic, group, &self.retry_flag)
    }

    /// Same popped message (stable across renewals).
    pub fn same_msg(&self, other: &Receipt) -> bool {
        self.broker_name == other.broker_name
            && self.topic == other.topic
            && self.retry_flag == other.retry_flag
            && self.queue_id == other.queue_id
            && self.queue_offset == other.queue_offset
    }

    /// When the broker makes the message visible again.
    pub fn visible_at_ms(&self) -> i64 {
        self.pop_time.saturating_add(self.invisible_ms)
    }

    pub fn ck_queue_offset(&self) -> Option<i64> {
        parse_extra_info(&self.extra_info).ok().map(|e| e.ck_queue_offset)
    }
}

/// The 8 fields of `ExtraInfoUtil` (+ rocketmq-rust's 9th, kept verbatim).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtraInfo {
    pub ck_queue_offset: i64,
    pub pop_time: i64,
    pub invisible_time: i64,
    pub revive_qid: i32,
    pub retry_flag: String,
    pub broker_name: String,
    pub queue_id: i32,
    pub queue_offset: i64,
    /// Anything after the 8th field (rocketmq-rust appends a retry generation to POP_CK).
    pub extra: Vec<String>,
}

fn xerr(handle: &str, problem: impl Into<String>) -> PopError {
    PopError::ExtraInfo { handle: handle.to_owned(), problem: problem.into() }
}

/// Parses an 8- or 9-field handle (`KEY_SEPARATOR` is one space).
pub fn parse_extra_info(s: &str) -> Result<ExtraInfo, PopError> {
    let f: Vec<&str> = s.split(' ').collect();
    if f.len() < 8 {
        return Err(xerr(s, format!("has {} fields, expected 8 or 9", f.len())));
    }
    fn num<T: std::str::FromStr>(s: &str, f: &str, name: &str) -> Result<T, PopError> {
        f.parse().map_err(|_| xerr(s, format!("{name} {f:?} is not a number")))
    }
    Ok(ExtraInfo {
        ck_queue_offset: num(s, f[0], "ckQueueOffset")?,
        pop_time: num(s, f[1], "popTime")?,
        invisible_time: num(s, f[2], "invisibleTime")?,
        revive_qid: num(s, f[3], "reviveQid")?,
        retry_flag: f[4].to_owned(),
        broker_name: f[5].to_owned(),
        queue_id: num(s, f[6], "queueId")?,
        queue_offset: num(s, f[7], "queueOffset")?,
        extra: f[8..].iter().map(|x| (*x).to_owned()).collect(),
    })
}

/// `ExtraInfoUtil.buildExtraInfo` (8 fields).
#[allow(clippy::too_many_arguments)]
pub fn build_extra_info(
    ck_queue_offset: i64,
    pop_time: i64,
    invisible_time: i64,
    revive_qid: i32,
    retry_flag: &str,
    broker_name: &str,
    queue_id: i32,
    queue_offset: i64,
) -> String {
    format!("{ck_queue_offset} {pop_time} {invisible_time} {revive_qid} {retry_flag} {broker_name} {queue_id} {queue_offset}")
}

/// `ExtraInfoUtil.getRetry(topic)`: "2" for V2 pop-retry topics (`%RETRY%g+t`), "1" for any other
/// `%RETRY%` topic, else "0".
pub fn retry_flag_of(topic: &str) -> &'static str {
    match topic.strip_prefix(RETRY_PREFIX) {
        Some(rest) if rest.contains('+') => "2",
        Some(_) => "1",
        None => "0",
    }
}

/// `ExtraInfoUtil.getRealTopic`: the topic a handle with this retry flag was popped from when
/// `topic` was requested. Wrong for pops made directly on a `%RETRY%group` topic (rf "1"), which is
/// why receipts record the popped topic instead of recomputing it.
pub fn real_topic(topic: &str, group: &str, retry_flag: &str) -> String {
    if topic.starts_with(RETRY_PREFIX) {
        return topic.to_owned();
    }
    match retry_flag {
        "1" => format!("{RETRY_PREFIX}{group}_{topic}"),
        "2" => format!("{RETRY_PREFIX}{group}+{topic}"),
        _ => topic.to_owned(),
    }
}

/// What the broker would recompute for a BatchAck (`getRealTopic(t, c, r)` with no `%RETRY%` guard).
pub(crate) fn broker_real_topic(topic: &str, group: &str, retry_flag: &str) -> String {
    match retry_flag {
        "1" => format!("{RETRY_PREFIX}{group}_{topic}"),
        "2" => format!("{RETRY_PREFIX}{group}+{topic}"),
        _ => topic.to_owned(),
    }
}

fn ext<'a>(h: &'a Header, what: &'static str, field: &'static str) -> Result<&'a str, PopError> {
    h.ext(field).ok_or(PopError::ResponseField { what, field, problem: "missing".into() })
}

fn ext_num<T: std::str::FromStr>(h: &Header, what: &'static str, field: &'static str) -> Result<T, PopError> {
    let v = ext(h, what, field)?;
    v.trim().parse().map_err(|_| PopError::ResponseField {
        what,
        field,
        problem: format!("not a number: {v:?}"),
    })
}

/// `startOffsetInfo` "rf qid off;…" → {"rf@qid": off}.
pub fn parse_start_offset_info(s: &str) -> Result<HashMap<String, i64>, PopError> {
    let mut m = HashMap::new();
    for one in s.split(';').filter(|x| !x.is_empty()) {
        let p: Vec<&str> = one.split(' ').collect();
        let bad = |problem: &str| PopError::OffsetInfo {
            field: "startOffsetInfo",
            value: s.to_owned(),
            problem: format!("{problem} in {one:?}"),
        };
        if p.len() != 3 {
            return Err(bad("expected \"retry queueId offset\""));
        }
        let off = p[2].parse().map_err(|_| bad("offset is not a number"))?;
        m.insert(format!("{}@{}", p[0], p[1]), off);
    }
    Ok(m)
}

/// `msgOffsetInfo` "rf qid o1,o2;…" → {"rf@qid": [o1, o2]}.
pub fn parse_msg_offset_info(s: &str) -> Result<HashMap<String, Vec<i64>>, PopError> {
    let mut m = HashMap::new();
    for one in s.split(';').filter(|x| !x.is_empty()) {
        let p: Vec<&str> = one.split(' ').collect();
        let bad = |problem: &str| PopError::OffsetInfo {
            field: "msgOffsetInfo",
            value: s.to_owned(),
            problem: format!("{problem} in {one:?}"),
        };
        if p.len() != 3 {
            return Err(bad("expected \"retry queueId o1,o2,…\""));
        }
        let offs = p[2]
            .split(',')
            .map(|o| o.parse::<i64>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| bad("an offset is not a number"))?;
        m.insert(format!("{}@{}", p[0], p[1]), offs);
    }
    Ok(m)
}

/// Builds one receipt per message of a SUCCESS POP response, in body order.
pub fn receipts_from_pop(
    resp: &Header,
    body: &[u8],
    broker_name: &str,
    popped_topic: &str,
) -> Result<Vec<(StoredMsg, Receipt)>, PopError> {
    const W: &str = "POP_MESSAGE";
    if resp.code != SUCCESS {
        return Err(PopError::NotSuccess {
            code: resp.code,
            code_name: response_code_name(resp.code).unwrap_or("unknown"),
        });
    }
    let msgs = parse_batch(body)?;
    if msgs.is_empty() {
        return Ok(Vec::new());
    }
    let pop_time: i64 = ext_num(resp, W, "popTime")?;
    let invisible: i64 = ext_num(resp, W, "invisibleTime")?;
    let revive_qid: i32 = ext_num(resp, W, "reviveQid")?;
    // Absent on brokers older than startOffsetInfo; Java then uses the message's own offset.
    let start = match resp.ext("startOffsetInfo") {
        Some(s) => parse_start_offset_info(s)?,
        None => HashMap::new(),
    };
    let offsets = match resp.ext("msgOffsetInfo") {
        Some(s) => parse_msg_offset_info(s)?,
        None => HashMap::new(),
    };
    // Java: index of the message's offset among the offsets seen for its key, in body order.
    let mut seen: HashMap<String, Vec<i64>> = HashMap::new();
    let mut out = Vec::with_capacity(msgs.len());
    for m in msgs {
        let (extra_info, info) = match m.property("POP_CK") {
            // Revived messages: the broker built the handle; their topic was relabelled, so
            // the "rf@qid" maps would point at the wrong queue.
            Some(ck) => (ck.to_owned(), parse_extra_info(ck)?),
            None => {
                let rf = retry_flag_of(&m.topic);
                let key = format!("{rf}@{}", m.queue_id);
                let list = seen.entry(key.clone()).or_default();
                list.push(m.queue_offset);
                let index = list.iter().position(|&o| o == m.queue_offset).unwrap_or(0);
                let msg_offset = offsets
                    .get(&key)
                    .and_then(|v| v.get(index))
                    .copied()
                    .unwrap_or(m.queue_offset);
                let ck = start.get(&key).copied().unwrap_or(m.queue_offset);
                let s = build_extra_info(ck, pop_time, invisible, revive_qid, rf, broker_name, m.queue_id, msg_offset);
                let info = parse_extra_info(&s)?;
                (s, info)
            }
        };
        let topic = if !popped_topic.starts_with(RETRY_PREFIX) && m.topic.starts_with(RETRY_PREFIX) {
            // popResponseReturnActualRetryTopic=true: the body already names the retry topic.
            m.topic.clone()
        } else {
            popped_topic.to_owned()
        };
        let r = Receipt {
            broker_name: info.broker_name.clone(),
            broker_addr: None,
            topic,
            original_topic: popped_topic.to_owned(),
            queue_id: info.queue_id,
            queue_offset: info.queue_offset,
            commit_log_offset: m.commit_log_offset,
            uniq_key: m.uniq_key().map(str::to_owned),
            reconsume_times: m.reconsume_times,
            invisible_ms: info.invisible_time,
            pop_time: info.pop_time,
            revive_qid: info.revive_qid,
            retry_flag: info.retry_flag.clone(),
            extra_info,
        };
        out.push((m, r));
    }
    Ok(out)
}

/// The receipt after a successful CHANGE_MESSAGE_INVISIBLETIME: the broker wrote a new CK at the
/// message's own offset, so the new handle is `offset popTime invisibleTime reviveQid rf broker qid offset`.
pub fn renewed(receipt: &Receipt, resp: &Header) -> Result<Receipt, PopError> {
    const W: &str = "CHANGE_MESSAGE_INVISIBLETIME";
    if resp.code != SUCCESS {
        return Err(PopError::NotSuccess {
            code: resp.code,
            code_name: response_code_name(resp.code).unwrap_or("unknown"),
        });
    }
    let pop_time: i64 = ext_num(resp, W, "popTime")?;
    let invisible: i64 = ext_num(resp, W, "invisibleTime")?;
    let revive_qid: i32 = ext_num(resp, W, "reviveQid")?;
    // Java uses getRetry(realTopic); the recorded flag is the same thing and, unlike
    // `self.topic`, also right for revived messages recorded under the normal topic.
    let rf = if receipt.retry_flag.is_empty() { retry_flag_of(&receipt.topic) } else { receipt.retry_flag.as_str() };
    let mut r = receipt.clone();
    r.extra_info = build_extra_info(
        receipt.queue_offset,
        pop_time,
        invisible,
        revive_qid,
        rf,
        &receipt.broker_name,
        receipt.queue_id,
        receipt.queue_offset,
    );
    r.pop_time = pop_time;
    r.invisible_ms = invisible;
    r.revive_qid = revive_qid;
    r.retry_flag = rf.to_owned();
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::super::batch::encode_stored;
    use super::*;

    fn resp(ext: &[(&str, &str)]) -> Header {
        let mut h = Header::response(0, 1, None);
        h.ext_fields = ext.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        h
    }

    #[test]
    fn extra_info_round_trip_and_errors() {
        let s = "3 1000 5000 2 0 broker-a 1 4";
        let e = parse_extra_info(s).unwrap();
        assert_eq!((e.ck_queue_offset, e.queue_id, e.queue_offset, e.revive_qid), (3, 1, 4, 2));
        assert_eq!(build_extra_info(3, 1000, 5000, 2, "0", "broker-a", 1, 4), s);
        let nine = parse_extra_info("0 1 30000 6 1 broker-a 0 0 0").unwrap();
        assert_eq!(nine.extra, vec!["0".to_owned()]);
        assert!(parse_extra_info("1 2 3").is_err());
        assert!(parse_extra_info("x 1 2 3 0 b 1 2").is_err());
    }

    #[test]
    fn retry_topics() {
        assert_eq!(retry_flag_of("T"), "0");
        assert_eq!(retry_flag_of("%RETRY%g_T"), "1");
        assert_eq!(retry_flag_of("%RETRY%g+T"), "2");
        assert_eq!(real_topic("T", "g", "1"), "%RETRY%g_T");
        assert_eq!(real_topic("T", "g", "2"), "%RETRY%g+T");
        assert_eq!(real_topic("%RETRY%g", "g", "1"), "%RETRY%g");
    }

    #[test]
    fn builds_like_java() {
        let mut body = encode_stored(false, 1, 7, 100, 0, 0, "T", &[("UNIQ_KEY", "A")], b"a");
        body.extend(encode_stored(false, 1, 9, 200, 0, 0, "T", &[], b"b"));
        body.extend(encode_stored(false, 0, 2, 300, 0, 1, "T", &[("POP_CK", "2 50 30000 4 1 bk 0 2 0")], b"c"));
        let h = resp(&[
            ("popTime", "1000"),
            ("invisibleTime", "60000"),
            ("reviveQid", "3"),
            ("startOffsetInfo", "0 1 7;1 0 2"),
            ("msgOffsetInfo", "0 1 7,9;1 0 2"),
        ]);
        let rs = receipts_from_pop(&h, &body, "bk", "T").unwrap();
        assert_eq!(rs.len(), 3);
        assert_eq!(rs[0].1.extra_info, "7 1000 60000 3 0 bk 1 7");
        assert_eq!(rs[1].1.extra_info, "7 1000 60000 3 0 bk 1 9");
        assert_eq!(rs[0].1.uniq_key.as_deref(), Some("A"));
        let r = &rs[2].1;
        assert_eq!(r.extra_info, "2 50 30000 4 1 bk 0 2 0");
        assert_eq!((r.topic.as_str(), r.original_topic.as_str()), ("T", "T"));
        assert_eq!(r.ack_topic("g"), "%RETRY%g_T");
        assert_eq!(rs[0].1.ack_topic("g"), "T");
        assert_eq!((r.queue_id, r.queue_offset, r.pop_time, r.revive_qid), (0, 2, 50, 4));

        // Popping the group's %RETRY% topic directly: record that topic, not %RETRY%g_%RETRY%g.
        let b2 = encode_stored(false, 0, 5, 1, 0, 0, "%RETRY%g", &[], b"d");
        let h2 = resp(&[("popTime", "1"), ("invisibleTime", "2"), ("reviveQid", "0"), ("startOffsetInfo", "1 0 5"), ("msgOffsetInfo", "1 0 5")]);
        let rs = receipts_from_pop(&h2, &b2, "bk", "%RETRY%g").unwrap();
        assert_eq!(rs[0].1.topic, "%RETRY%g");
        assert_eq!(rs[0].1.ack_topic("g"), "%RETRY%g");
        assert_eq!(rs[0].1.extra_info, "5 1 2 0 1 bk 0 5");

        assert!(receipts_from_pop(&resp(&[]), &body, "bk", "T").is_err());
        let mut nf = resp(&[]);
        nf.code = 19;
        assert!(matches!(receipts_from_pop(&nf, &[], "bk", "T"), Err(PopError::NotSuccess { .. })));
        // rocketmq-rust P2 (offsets joined with ';') must not be silently mis-mapped.
        let p2 = resp(&[("popTime", "1"), ("invisibleTime", "2"), ("reviveQid", "0"), ("startOffsetInfo", "0 1 7"), ("msgOffsetInfo", "0 1 7;9")]);
        assert!(receipts_from_pop(&p2, &body, "bk", "T").is_err());
    }

    #[test]
    fn renewal_builds_new_handle() {
        let r = Receipt {
            broker_name: "bk".into(),
            broker_addr: None,
            topic: "T".into(),
            original_topic: "T".into(),
            queue_id: 0,
            queue_offset: 2,
            extra_info: "2 50 30000 4 1 bk 0 2 0".into(),
            commit_log_offset: 1,
            uniq_key: None,
            reconsume_times: 1,
            invisible_ms: 30000,
            pop_time: 50,
            revive_qid: 4,
            retry_flag: "1".into(),
        };
        let h = resp(&[("popTime", "99"), ("invisibleTime", "1000"), ("reviveQid", "5")]);
        let n = renewed(&r, &h).unwrap();
        assert_eq!(n.extra_info, "2 99 1000 5 1 bk 0 2");
        assert_eq!((n.pop_time, n.invisible_ms, n.revive_qid, n.visible_at_ms()), (99, 1000, 5, 1099));
        assert!(renewed(&r, &resp(&[("popTime", "99")])).is_err());
    }
}
