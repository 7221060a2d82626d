//! Walks a PULL/POP response body: concatenated stored messages (protocol.md §3.1).
//! Only what the agent needs is decoded; bodies stay untouched (possibly compressed).

use std::ops::Range;

use super::error::PopError;

pub const MAGIC_V1: i32 = -626843481; // 0xDAA320A7: topic length is an i8
pub const MAGIC_V2: i32 = -626843477; // 0xDAA320AB: topic length is an i16
pub const QUEUE_ID_POS: usize = 12;
pub const QUEUE_OFFSET_POS: usize = 20;
const BORNHOST_V6: i32 = 0x10;
const STOREHOST_V6: i32 = 0x20;

/// One stored message inside a batch body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMsg {
    /// The whole record (TOTALSIZE included) within the body.
    pub range: Range<usize>,
    pub queue_id: i32,
    pub queue_offset: i64,
    pub commit_log_offset: i64,
    pub sys_flag: i32,
    pub reconsume_times: i32,
    pub topic: String,
    /// In wire order; a repeated key keeps every occurrence (`property` returns the last, as Java's map does).
    pub properties: Vec<(String, String)>,
}

impl StoredMsg {
    pub fn property(&self, key: &str) -> Option<&str> {
        self.properties
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Client-side message id (`UNIQ_KEY`), when the producer set one.
    pub fn uniq_key(&self) -> Option<&str> {
        self.property("UNIQ_KEY").filter(|s| !s.is_empty())
    }
}

struct Cursor<'a> {
    rec: &'a [u8],
    pos: usize,
    at: usize,
}

impl<'a> Cursor<'a> {
    fn err(&self, what: String) -> PopError {
        PopError::Batch { at: self.at, what }
    }

    fn take(&mut self, n: usize, field: &str) -> Result<&'a [u8], PopError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.rec.len()).ok_or_else(|| {
            self.err(format!(
                "{field} needs {n} bytes at record offset {} but the record has {}",
                self.pos,
                self.rec.len()
            ))
        })?;
        let s = &self.rec[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn arr<const N: usize>(&mut self, field: &str) -> Result<[u8; N], PopError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, field)?);
        Ok(a)
    }

    fn i16(&mut self, f: &str) -> Result<i16, PopError> {
        self.arr(f).map(i16::from_be_bytes)
    }
    fn i32(&mut self, f: &str) -> Result<i32, PopError> {
        self.arr(f).map(i32::from_be_bytes)
    }
    fn i64(&mut self, f: &str) -> Result<i64, PopError> {
        self.arr(f).map(i64::from_be_bytes)
    }

    fn len(&mut self, v: i64, field: &str) -> Result<&'a [u8], PopError> {
        let n = usize::try_from(v).map_err(|_| self.err(format!("{field} length is negative ({v})")))?;
        self.take(n, field)
    }
}

/// `k\u0001v\u0002…`; entries without a separator are skipped, like Java's `string2messageProperties`.
pub fn parse_properties(s: &str) -> Vec<(String, String)> {
    s.split('\u{2}')
        .filter_map(|kv| kv.split_once('\u{1}'))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn decode_one(body: &[u8], at: usize) -> Result<StoredMsg, PopError> {
    let head = Cursor { rec: &body[at..], pos: 0, at };
    let mut c = head;
    let total = c.i32("TOTALSIZE")?;
    // 4 (size) + 4 (magic) is the least a record can be; anything smaller would loop forever.
    let size = usize::try_from(total)
        .ok()
        .filter(|&n| n >= 8 && n <= body.len() - at)
        .ok_or_else(|| {
            c.err(format!(
                "TOTALSIZE {total} does not fit the {} bytes left",
                body.len() - at
            ))
        })?;
    let mut c = Cursor { rec: &body[at..at + size], pos: 4, at };
    let magic = c.i32("MAGICCODE")?;
    if magic != MAGIC_V1 && magic != MAGIC_V2 {
        return Err(c.err(format!("unknown MAGICCODE {magic:#010x}")));
    }
    c.take(4, "BODYCRC")?;
    let queue_id = c.i32("QUEUEID")?;
    c.take(4, "FLAG")?;
    let queue_offset = c.i64("QUEUEOFFSET")?;
    let commit_log_offset = c.i64("PHYSICALOFFSET")?;
    let sys_flag = c.i32("SYSFLAG")?;
    c.take(8, "BORNTIMESTAMP")?;
    c.take(if sys_flag & BORNHOST_V6 != 0 { 20 } else { 8 }, "BORNHOST")?;
    c.take(8, "STORETIMESTAMP")?;
    c.take(if sys_flag & STOREHOST_V6 != 0 { 20 } else { 8 }, "STOREHOST")?;
    let reconsume_times = c.i32("RECONSUMETIMES")?;
    c.take(8, "PREPAREDTRANSACTIONOFFSET")?;
    let body_len = c.i32("BODYLEN")?;
    c.len(body_len.into(), "BODY")?;
    let topic_len: i64 = if magic == MAGIC_V2 {
        c.i16("TOPICLEN")?.into()
    } else {
        // Java reads a signed byte; a V1 topic is at most 127 bytes.
        i8::from_be_bytes(c.arr("TOPICLEN")?).into()
    };
    let topic = String::from_utf8_lossy(c.len(topic_len, "TOPIC")?).into_owned();
    let prop_len = c.i16("PROPERTIESLENGTH")?;
    let props = c.len(prop_len.into(), "PROPERTIES")?;
    Ok(StoredMsg {
        range: at..at + size,
        queue_id,
        queue_offset,
        commit_log_offset,
        sys_flag,
        reconsume_times,
        topic,
        properties: parse_properties(&String::from_utf8_lossy(props)),
    })
}

/// Splits a batch body into its messages; any malformed record fails the whole batch.
pub fn parse_batch(body: &[u8]) -> Result<Vec<StoredMsg>, PopError> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < body.len() {
        let m = decode_one(body, at)?;
        at = m.range.end;
        out.push(m);
    }
    Ok(out)
}

fn field<'a>(body: &'a mut [u8], msg: &StoredMsg, pos: usize, n: usize) -> Result<&'a mut [u8], PopError> {
    let len = body.len();
    let ok = msg.range.start <= msg.range.end && msg.range.end <= len && msg.range.len() >= pos + n;
    if !ok {
        return Err(PopError::RecordOutOfBody { range: msg.range.clone(), len });
    }
    Ok(&mut body[msg.range.start + pos..msg.range.start + pos + n])
}

/// Sets QUEUEOFFSET in place (clients don't check BODYCRC, and it doesn't cover this field anyway).
pub fn rewrite_queue_offset(body: &mut [u8], msg: &StoredMsg, new_offset: i64) -> Result<(), PopError> {
    field(body, msg, QUEUE_OFFSET_POS, 8)?.copy_from_slice(&new_offset.to_be_bytes());
    Ok(())
}

/// Sets QUEUEID in place (virtual queue id).
pub fn rewrite_queue_id(body: &mut [u8], msg: &StoredMsg, queue_id: i32) -> Result<(), PopError> {
    field(body, msg, QUEUE_ID_POS, 4)?.copy_from_slice(&queue_id.to_be_bytes());
    Ok(())
}

/// Test/bench helper: encodes one stored message the way the broker stores it.
#[allow(clippy::too_many_arguments)]
pub fn encode_stored(
    v2: bool,
    queue_id: i32,
    queue_offset: i64,
    commit_log_offset: i64,
    sys_flag: i32,
    reconsume_times: i32,
    topic: &str,
    properties: &[(&str, &str)],
    payload: &[u8],
) -> Vec<u8> {
    let mut r = Vec::new();
    r.extend_from_slice(&0i32.to_be_bytes());
    r.extend_from_slice(&(if v2 { MAGIC_V2 } else { MAGIC_V1 }).to_be_bytes());
    r.extend_from_slice(&0i32.to_be_bytes()); // crc
    r.extend_from_slice(&queue_id.to_be_bytes());
    r.extend_from_slice(&0i32.to_be_bytes()); // flag
    r.extend_from_slice(&queue_offset.to_be_bytes());
    r.extend_from_slice(&commit_log_offset.to_be_bytes());
    r.extend_from_slice(&sys_flag.to_be_bytes());
    r.extend_from_slice(&1i64.to_be_bytes()); // born ts
    r.extend(std::iter::repeat_n(7u8, if sys_flag & BORNHOST_V6 != 0 { 20 } else { 8 }));
    r.extend_from_slice(&2i64.to_be_bytes()); // store ts
    r.extend(std::iter::repeat_n(9u8, if sys_flag & STOREHOST_V6 != 0 { 20 } else { 8 }));
    r.extend_from_slice(&reconsume_times.to_be_bytes());
    r.extend_from_slice(&0i64.to_be_bytes());
    r.extend_from_slice(&(payload.len() as i32).to_be_bytes());
    r.extend_from_slice(payload);
    if v2 {
        r.extend_from_slice(&(topic.len() as i16).to_be_bytes());
    } else {
        r.push(topic.len() as u8);
    }
    r.extend_from_slice(topic.as_bytes());
    let props: String = properties.iter().map(|(k, v)| format!("{k}\u{1}{v}\u{2}")).collect();
    r.extend_from_slice(&(props.len() as i16).to_be_bytes());
    r.extend_from_slice(props.as_bytes());
    let n = r.len() as i32;
    r[..4].copy_from_slice(&n.to_be_bytes());
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_v2_ipv4_ipv6() {
        let long_topic = "%RETRY%g_".to_owned() + &"t".repeat(200);
        let mut body = encode_stored(false, 1, 5, 100, 0, 0, "T", &[("UNIQ_KEY", "U1"), ("TAGS", "a")], b"x");
        body.extend(encode_stored(true, 2, 6, 200, 0x30, 3, &long_topic, &[("POP_CK", "0 1 2 3 1 b 2 6")], b""));
        body.extend(encode_stored(false, 3, 7, 300, 0x10, 0, "T", &[], b"yy"));
        let msgs = parse_batch(&body).unwrap();
        assert_eq!(msgs.len(), 3);
        assert_eq!((msgs[0].queue_id, msgs[0].queue_offset, msgs[0].commit_log_offset), (1, 5, 100));
        assert_eq!(msgs[0].uniq_key(), Some("U1"));
        assert_eq!(msgs[1].topic, long_topic);
        assert_eq!(msgs[1].reconsume_times, 3);
        assert_eq!(msgs[1].property("POP_CK"), Some("0 1 2 3 1 b 2 6"));
        assert_eq!(msgs[2].range.end, body.len());
        rewrite_queue_offset(&mut body, &msgs[1], 42).unwrap();
        rewrite_queue_id(&mut body, &msgs[1], 0).unwrap();
        let again = parse_batch(&body).unwrap();
        assert_eq!((again[1].queue_id, again[1].queue_offset), (0, 42));
        assert_eq!(again[0], msgs[0]);
        assert!(rewrite_queue_offset(&mut body[..10], &msgs[1], 1).is_err());
    }

    #[test]
    fn malformed_never_panics() {
        let rec = encode_stored(false, 1, 5, 100, 0x30, 0, "Topic", &[("A", "b")], b"payload");
        assert!(parse_batch(&[]).unwrap().is_empty());
        for cut in 0..rec.len() {
            assert!(parse_batch(&rec[..cut]).is_err() || cut == 0, "cut {cut}");
        }
        for i in 0..rec.len() {
            for v in [0u8, 0x7f, 0x80, 0xff] {
                let mut m = rec.clone();
                m[i] = v;
                let _ = parse_batch(&m);
            }
        }
        let mut bad = rec.clone();
        bad[4] = 0;
        assert!(matches!(parse_batch(&bad), Err(PopError::Batch { at: 0, .. })));
    }
}
