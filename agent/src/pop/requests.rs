//! Frames the agent originates for converted groups (POP family, DLQ send-back) and the local
//! answers it gives the client. Headers are JSON: POP-family codes overflow the binary header's
//! i16 code (protocol.md §1.3), and CPP/Node clients read only JSON.
//!
//! `version` is [`AGENT_VERSION`] (401 = V4_9_4), the same as every other header the agent makes:
//! neither the Java broker's nor this broker's POP/ACK/CIT path gates on the request version, and
//! ≥ 401 keeps name-server answers in standard JSON. Ext values are always strings.

use base64::Engine as _;
use serde_json::json;

use crate::codec::code::*;
use crate::codec::header::{Header, SerializeType, AGENT_VERSION};

use super::error::PopError;
use super::receipt::{broker_real_topic, Receipt};

/// POP's `maxMsgNums` limit (broker answers INVALID_PARAMETER above it).
pub const POP_MAX_MSGS: i32 = 32;

fn request(code: i32, opaque: i32, ext: Vec<(&str, String)>) -> Header {
    Header {
        code,
        language: "JAVA".into(),
        version: AGENT_VERSION,
        opaque,
        flag: 0,
        remark: None,
        ext_fields: ext.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
        serialize_type: SerializeType::Json,
    }
}

fn response(code: i32, opaque: i32, remark: Option<String>, ext: Vec<(&str, String)>) -> Header {
    let mut h = Header::response(code, opaque, remark);
    h.ext_fields = ext.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
    h
}

/// POP_MESSAGE (200050). `queue_id` -1 = all queues; `max_msgs` is clamped to 1..=32;
/// `init_mode` 0 = MIN, 1 = MAX; `exp_type`/`exp` from the client's subscription.
#[allow(clippy::too_many_arguments)]
pub fn pop(
    opaque: i32,
    group: &str,
    topic: &str,
    queue_id: i32,
    max_msgs: i32,
    invisible_ms: i64,
    poll_ms: i64,
    born_ms: i64,
    init_mode: i32,
    exp_type: &str,
    exp: &str,
) -> (Header, Vec<u8>) {
    let h = request(
        POP_MESSAGE,
        opaque,
        vec![
            ("consumerGroup", group.into()),
            ("topic", topic.into()),
            ("queueId", queue_id.to_string()),
            ("maxMsgNums", max_msgs.clamp(1, POP_MAX_MSGS).to_string()),
            ("invisibleTime", invisible_ms.to_string()),
            ("pollTime", poll_ms.max(0).to_string()),
            // Never "0": with ACL 2.0 the broker skips its fix-up and answers "timeout too much".
            ("bornTime", born_ms.to_string()),
            ("initMode", init_mode.to_string()),
            ("expType", exp_type.into()),
            ("exp", exp.into()),
            ("order", "false".into()),
        ],
    );
    (h, Vec::new())
}

/// ACK_MESSAGE (200051) for one receipt; header topic = the topic it was popped from.
pub fn ack(opaque: i32, group: &str, receipt: &Receipt) -> (Header, Vec<u8>) {
    (request(ACK_MESSAGE, opaque, receipt_fields(group, receipt)), Vec::new())
}

/// The fields ACK and CHANGE_MESSAGE_INVISIBLETIME identify a popped message by.
fn receipt_fields(group: &str, receipt: &Receipt) -> Vec<(&'static str, String)> {
    vec![
        ("consumerGroup", group.into()),
        ("topic", receipt.ack_topic(group)),
        ("queueId", receipt.queue_id.to_string()),
        ("extraInfo", receipt.extra_info.clone()),
        ("offset", receipt.queue_offset.to_string()),
        ("bname", receipt.broker_name.clone()),
    ]
}

/// Whether `receipt` can go into a BATCH_ACK to `broker_name`: same broker, and the broker's
/// `getRealTopic(t, c, r)` recomputes its topic (false for pops made directly on `%RETRY%group`,
/// which need a single ACK).
pub fn batch_ackable(group: &str, broker_name: &str, receipt: &Receipt) -> bool {
    receipt.broker_name == broker_name
        && broker_real_topic(&receipt.original_topic, group, &receipt.retry_flag) == receipt.ack_topic(group)
        && receipt
            .ck_queue_offset()
            .is_some_and(|ck| (0..=i64::from(i32::MAX)).contains(&(receipt.queue_offset - ck)))
}

/// How the BatchAck bit set `b` is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum BitSetFormat {
    /// Java (`BitSetSerializerDeserializer`): base64 of `BitSet.toByteArray()`.
    #[default]
    JavaBase64,
    /// rocketmq-rust 1.0.0: a JSON array of byte values, padded to whole little-endian u64 words
    /// (its deserializer rejects the Java form).
    RustByteArray,
}

/// `BitSet.toByteArray()`: little-endian, bit i ⇒ byte i/8, bit i%8; trailing zero bytes dropped.
pub fn bitset_bytes(bits: &[u32]) -> Vec<u8> {
    let mut out = Vec::new();
    for &b in bits {
        let byte = (b / 8) as usize;
        if out.len() <= byte {
            out.resize(byte + 1, 0);
        }
        out[byte] |= 1 << (b % 8);
    }
    out
}

/// BATCH_ACK_MESSAGE (200151), Java bit-set format. See [`batch_ack_with`].
pub fn batch_ack(opaque: i32, group: &str, broker_name: &str, receipts: &[Receipt]) -> Result<(Header, Vec<u8>), PopError> {
    batch_ack_with(opaque, group, broker_name, receipts, BitSetFormat::JavaBase64)
}

/// BATCH_ACK_MESSAGE body `{"acks":[…],"brokerName":…}`, one BatchAck per `rf@qid@ckOffset@popTime`
/// (bit i ⇒ offset ckOffset+i). Every receipt must pass [`batch_ackable`]; send the rest as single ACKs.
pub fn batch_ack_with(
    opaque: i32,
    group: &str,
    broker_name: &str,
    receipts: &[Receipt],
    format: BitSetFormat,
) -> Result<(Header, Vec<u8>), PopError> {
    if receipts.is_empty() {
        return Err(PopError::BatchAck("no receipts".into()));
    }
    // Merge key rf@qid@ckOffset@popTime → (first receipt, bits); ordered so the body is deterministic.
    type Key = (String, i32, i64, i64);
    let mut groups: std::collections::BTreeMap<Key, (&Receipt, Vec<u32>)> = Default::default();
    for r in receipts {
        if !batch_ackable(group, broker_name, r) {
            return Err(PopError::BatchAck(format!(
                "receipt {:?} (topic {}, broker {}) needs a single ACK_MESSAGE",
                r.extra_info, r.topic, r.broker_name
            )));
        }
        let ck = r.ck_queue_offset().unwrap_or(r.queue_offset); // ackable ⇒ Some
        let bit = u32::try_from(r.queue_offset - ck).unwrap_or(0); // ackable ⇒ in range
        groups
            .entry((r.retry_flag.clone(), r.queue_id, ck, r.pop_time))
            .or_insert_with(|| (r, Vec::new()))
            .1
            .push(bit);
    }
    let acks: Vec<serde_json::Value> = groups
        .into_iter()
        .map(|((rf, qid, ck, pt), (first, bits))| {
            let bytes = bitset_bytes(&bits);
            let b = match format {
                BitSetFormat::JavaBase64 => json!(base64::engine::general_purpose::STANDARD.encode(&bytes)),
                BitSetFormat::RustByteArray => {
                    let mut padded = bytes;
                    padded.resize(padded.len().div_ceil(8).max(1) * 8, 0);
                    json!(padded)
                }
            };
            json!({
                "b": b,
                "c": group,
                "it": first.invisible_ms,
                "pt": pt,
                "q": qid,
                "r": rf,
                "rq": first.revive_qid,
                "so": ck,
                "t": first.original_topic,
            })
        })
        .collect();
    let body = serde_json::to_vec(&json!({"acks": acks, "brokerName": broker_name}))
        .map_err(|e| PopError::BatchAck(e.to_string()))?;
    Ok((request(BATCH_ACK_MESSAGE, opaque, Vec::new()), body))
}

/// CHANGE_MESSAGE_INVISIBLETIME (200053): renewal (long) or release/nack (short).
pub fn change_invisible(opaque: i32, group: &str, receipt: &Receipt, invisible_ms: i64) -> (Header, Vec<u8>) {
    let mut fields = receipt_fields(group, receipt);
    fields.insert(5, ("invisibleTime", invisible_ms.to_string()));
    (request(CHANGE_MESSAGE_INVISIBLETIME, opaque, fields), Vec::new())
}

/// CONSUMER_SEND_MSG_BACK (36) with delayLevel -1: the broker moves the message to `%DLQ%group`
/// (pop revive has no DLQ). ACK the receipt after SUCCESS.
pub fn send_msg_back_to_dlq(opaque: i32, group: &str, receipt: &Receipt, max_reconsume: i32) -> (Header, Vec<u8>) {
    let mut ext = vec![
        ("offset", receipt.commit_log_offset.to_string()),
        ("group", group.into()),
        ("delayLevel", "-1".into()),
    ];
    if let Some(u) = &receipt.uniq_key {
        ext.push(("originMsgId", u.clone()));
    }
    ext.push(("originTopic", receipt.original_topic.clone()));
    ext.push(("unitMode", "false".into()));
    ext.push(("maxReconsumeTimes", max_reconsume.to_string()));
    ext.push(("bname", receipt.broker_name.clone()));
    (request(CONSUMER_SEND_MSG_BACK, opaque, ext), Vec::new())
}

fn pull_ext(next_begin: i64, min: i64, max: i64) -> Vec<(&'static str, String)> {
    // All four are @CFNotNull in the Java client: a missing one fails the whole pull.
    vec![
        ("nextBeginOffset", next_begin.to_string()),
        ("minOffset", min.to_string()),
        ("maxOffset", max.to_string()),
        ("suggestWhichBrokerId", "0".into()),
    ]
}

/// PULL FOUND (code 0) carrying the rewritten batch.
pub fn pull_found(opaque: i32, next_begin: i64, min: i64, max: i64, body: &[u8]) -> (Header, Vec<u8>) {
    (response(SUCCESS, opaque, None, pull_ext(next_begin, min, max)), body.to_vec())
}

/// PULL_NOT_FOUND (19): the client pulls again at `next_begin` (= its own X). Never OFFSET_MOVED.
pub fn pull_not_found(opaque: i32, next_begin: i64) -> (Header, Vec<u8>) {
    let h = response(PULL_NOT_FOUND, opaque, Some("no new message".into()), pull_ext(next_begin, 0, next_begin));
    (h, Vec::new())
}

/// QUERY_CONSUMER_OFFSET answered locally.
pub fn query_offset(opaque: i32, offset: i64) -> (Header, Vec<u8>) {
    (response(SUCCESS, opaque, None, vec![("offset", offset.to_string())]), Vec::new())
}

/// GET_CONSUMER_LIST_BY_GROUP answered locally.
pub fn consumer_list(opaque: i32, client_ids: &[String]) -> (Header, Vec<u8>) {
    let body = serde_json::to_vec(&json!({ "consumerIdList": client_ids })).unwrap_or_default();
    (response(SUCCESS, opaque, None, Vec::new()), body)
}

pub fn simple_ok(opaque: i32) -> (Header, Vec<u8>) {
    (response(SUCCESS, opaque, None, Vec::new()), Vec::new())
}

/// SYSTEM_BUSY (2): Java clients back off and retry (e.g. for POLLING_FULL upstream).
pub fn system_busy(opaque: i32, remark: &str) -> (Header, Vec<u8>) {
    (response(SYSTEM_BUSY, opaque, Some(remark.to_owned()), Vec::new()), Vec::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rc(qid: i32, ck: i64, off: i64, pt: i64, topic: &str, rf: &str) -> Receipt {
        Receipt {
            broker_name: "bk".into(),
            broker_addr: None,
            topic: topic.into(),
            original_topic: "T".into(),
            queue_id: qid,
            queue_offset: off,
            extra_info: format!("{ck} {pt} 60000 3 {rf} bk {qid} {off}"),
            commit_log_offset: 1,
            uniq_key: Some("U".into()),
            reconsume_times: 0,
            invisible_ms: 60000,
            pop_time: pt,
            revive_qid: 3,
            retry_flag: rf.into(),
        }
    }

    #[test]
    fn bitset_matches_java_to_byte_array() {
        assert_eq!(bitset_bytes(&[]), Vec::<u8>::new());
        assert_eq!(bitset_bytes(&[0]), vec![1]);
        assert_eq!(bitset_bytes(&[1, 9]), vec![2, 2]);
        assert_eq!(bitset_bytes(&[15]), vec![0, 0x80]);
    }

    #[test]
    fn batch_ack_groups_by_merge_key() {
        let rs = [
            rc(1, 7, 7, 100, "T", "0"),
            rc(1, 7, 9, 100, "T", "0"),
            rc(2, 0, 0, 100, "T", "0"),
            rc(0, 2, 3, 50, "T", "1"),
        ];
        let (h, body) = batch_ack(5, "g", "bk", &rs).unwrap();
        assert_eq!((h.code, h.opaque, h.serialize_type), (200151, 5, SerializeType::Json));
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["brokerName"], "bk");
        let acks = v["acks"].as_array().unwrap();
        assert_eq!(acks.len(), 3);
        assert_eq!(acks.iter().find(|a| a["q"] == 2).unwrap(), &json!({"b":"AQ==","c":"g","it":60000,"pt":100,"q":2,"r":"0","rq":3,"so":0,"t":"T"}));
        let q1 = acks.iter().find(|a| a["q"] == 1).unwrap();
        assert_eq!((q1["b"].as_str(), q1["so"].as_i64()), (Some("BQ=="), Some(7))); // bits 0 and 2
        let retry = acks.iter().find(|a| a["r"] == "1").unwrap();
        assert_eq!((retry["t"].as_str(), retry["b"].as_str()), (Some("T"), Some("Ag==")));
        let (_, rust) = batch_ack_with(5, "g", "bk", &rs[..2], BitSetFormat::RustByteArray).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&rust).unwrap();
        assert_eq!(v["acks"][0]["b"], json!([5, 0, 0, 0, 0, 0, 0, 0]));
    }

    #[test]
    fn batch_ack_refuses_what_needs_single_acks() {
        let mut direct = rc(0, 5, 5, 1, "%RETRY%g", "1");
        direct.original_topic = "%RETRY%g".into();
        assert!(!batch_ackable("g", "bk", &direct));
        assert!(batch_ack(1, "g", "bk", &[direct.clone()]).is_err());
        assert!(!batch_ackable("g", "other", &rc(0, 0, 0, 1, "T", "0")));
        assert!(!batch_ackable("g", "bk", &rc(0, 5, 4, 1, "T", "0"))); // offset below ck
        assert!(batch_ack(1, "g", "bk", &[]).is_err());
        let (h, _) = ack(2, "g", &direct);
        assert_eq!(h.ext("topic"), Some("%RETRY%g"));
        assert_eq!(h.ext("offset"), Some("5"));
    }

    #[test]
    fn request_headers() {
        let (h, b) = pop(9, "g", "T", -1, 1024, 60000, 15000, 1234, 1, "TAG", "*");
        assert!(b.is_empty());
        assert_eq!((h.code, h.language.as_str(), h.version, h.flag), (200050, "JAVA", 401, 0));
        assert_eq!(h.ext("maxMsgNums"), Some("32"));
        assert_eq!(h.ext("queueId"), Some("-1"));
        assert_eq!(h.ext("bornTime"), Some("1234"));
        let r = rc(3, 1, 2, 77, "T", "0");
        let (h, _) = change_invisible(1, "g", &r, 1000);
        assert_eq!(
            (h.code, h.ext("topic"), h.ext("queueId"), h.ext("offset"), h.ext("invisibleTime")),
            (200053, Some("T"), Some("3"), Some("2"), Some("1000"))
        );
        let (h, _) = send_msg_back_to_dlq(1, "g", &r, 16);
        assert_eq!((h.code, h.ext("delayLevel"), h.ext("offset"), h.ext("originMsgId")), (36, Some("-1"), Some("1"), Some("U")));
    }

    #[test]
    fn local_responses() {
        let (h, b) = pull_found(3, 13, 0, 20, &[1, 2]);
        assert!(h.is_response());
        assert_eq!((h.code, h.opaque, b.len()), (0, 3, 2));
        for k in ["nextBeginOffset", "minOffset", "maxOffset", "suggestWhichBrokerId"] {
            assert!(h.ext(k).is_some(), "{k}");
        }
        let (h, _) = pull_not_found(4, 10);
        assert_eq!((h.code, h.ext("nextBeginOffset"), h.ext("maxOffset")), (19, Some("10"), Some("10")));
        assert!(h.ext("minOffset").is_some() && h.ext("suggestWhichBrokerId").is_some());
        assert_eq!(query_offset(1, 5).0.ext("offset"), Some("5"));
        let (_, b) = consumer_list(1, &["a@1".to_owned()]);
        assert_eq!(b, br#"{"consumerIdList":["a@1"]}"#);
        assert_eq!(system_busy(1, "busy").0.code, 2);
        assert_eq!(simple_ok(1).0.code, 0);
    }
}
