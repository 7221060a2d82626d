//! A small hand-written RocketMQ remoting codec for the raw test clients, kept
//! independent of the agent's codec on purpose.
//!
//! Frame: `i32 BE total length` (= 4 + header length + body length), `i32 BE header
//! mark` (serialize type << 24 | header length; type 0 = JSON), header, body.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Map, Value};

/// GET_ROUTEINFO_BY_TOPIC: name server request.
pub const GET_ROUTEINFO_BY_TOPIC: i32 = 105;
/// GET_BROKER_CLUSTER_INFO: name server request.
pub const GET_BROKER_CLUSTER_INFO: i32 = 106;
/// HEART_BEAT: broker request.
pub const HEART_BEAT: i32 = 34;
/// SEND_MESSAGE (v1 header; what both SDKs here send).
pub const SEND_MESSAGE: i32 = 10;
/// PULL_MESSAGE.
pub const PULL_MESSAGE: i32 = 11;
/// Response code for a request code the server does not know.
pub const REQUEST_CODE_NOT_SUPPORTED: i32 = 3;
/// `flag` bit that marks a response.
pub const FLAG_RESPONSE: i32 = 1;

/// A decoded frame.
#[derive(Debug, Clone)]
pub struct Frame {
    pub header: Value,
    pub body: Vec<u8>,
}

impl Frame {
    pub fn code(&self) -> i64 {
        self.header["code"].as_i64().unwrap_or(i64::MIN)
    }
    pub fn opaque(&self) -> i64 {
        self.header["opaque"].as_i64().unwrap_or(i64::MIN)
    }
    pub fn flag(&self) -> i64 {
        self.header["flag"].as_i64().unwrap_or(0)
    }
    pub fn is_response(&self) -> bool {
        self.flag() & FLAG_RESPONSE as i64 != 0
    }
    pub fn remark(&self) -> Option<&str> {
        self.header["remark"].as_str()
    }
}

/// The JSON header a Java 4.x client sends (the field order matches the brief's example:
/// `{"code":105,"extFields":{"topic":"TBW102"},"flag":0,"language":"JAVA","opaque":1,...}`).
pub fn json_header(code: i32, opaque: i32, ext: &[(&str, &str)]) -> Vec<u8> {
    json_header_version(code, opaque, ext, 401)
}

/// Like [`json_header`], claiming protocol version `version` (an SDK's MQVersion ordinal).
pub fn json_header_version(code: i32, opaque: i32, ext: &[(&str, &str)], version: i32) -> Vec<u8> {
    let ext: Map<String, Value> = ext.iter().map(|(k, v)| (k.to_string(), json!(v))).collect();
    serde_json::to_vec(&json!({
        "code": code,
        "extFields": ext,
        "flag": 0,
        "language": "JAVA",
        "opaque": opaque,
        "serializeTypeCurrentRPC": "JSON",
        "version": version,
    }))
    .expect("a JSON header always serialises")
}

/// Frames an arbitrary header + body (type JSON); no validation, so it can carry bad headers.
pub fn encode(header: &[u8], body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + header.len() + body.len());
    out.extend_from_slice(&((4 + header.len() + body.len()) as i32).to_be_bytes());
    out.extend_from_slice(&(header.len() as i32).to_be_bytes());
    out.extend_from_slice(header);
    out.extend_from_slice(body);
    out
}

pub fn encode_request(code: i32, opaque: i32, ext: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    encode(&json_header(code, opaque, ext), body)
}

/// Deliberately broken inputs for the agent's decoder.
pub mod malformed {
    use super::*;

    /// Bytes that are not a frame (an HTTP request): length field 0x47455420 ("GET ").
    pub fn garbage() -> Vec<u8> {
        b"GET / HTTP/1.1\r\nHost: broker\r\n\r\n".to_vec()
    }

    /// A length prefix far above any sane max frame (0x7fff_ffff) and a few bytes.
    pub fn oversized_length() -> Vec<u8> {
        let mut v = 0x7fff_ffffi32.to_be_bytes().to_vec();
        v.extend_from_slice(&16i32.to_be_bytes());
        v.extend_from_slice(b"{\"code\":105}");
        v
    }

    /// A complete frame whose header mark claims more header bytes than the frame holds.
    pub fn truncated_header() -> Vec<u8> {
        let header = json_header(GET_ROUTEINFO_BY_TOPIC, 7, &[("topic", "TBW102")]);
        let mut v = Vec::new();
        v.extend_from_slice(&((4 + header.len()) as i32).to_be_bytes());
        v.extend_from_slice(&((header.len() + 100) as i32).to_be_bytes());
        v.extend_from_slice(&header);
        v
    }

    /// A well-framed request whose JSON header does not parse.
    pub fn invalid_json_header() -> Vec<u8> {
        encode(b"{\"code\":105,\"opaque\":8,\"extFields\":{\"topic\":", b"")
    }

    /// The first half of a valid frame; the sender then vanishes.
    pub fn partial_frame() -> Vec<u8> {
        let f = encode_request(GET_ROUTEINFO_BY_TOPIC, 9, &[("topic", "TBW102")], b"");
        f[..f.len() / 2].to_vec()
    }
}

/// A raw remoting connection (already connected, e.g. from a pod netns thread).
pub struct RemotingConn {
    stream: TcpStream,
    next_opaque: i32,
    version: i32,
}

impl RemotingConn {
    pub fn new(stream: TcpStream) -> Result<RemotingConn> {
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.set_nodelay(true)?;
        Ok(RemotingConn { stream, next_opaque: 1, version: 401 })
    }

    /// The pod-side address of the connection (what the agent shows as `pod`).
    pub fn local_addr(&self) -> Result<std::net::SocketAddr> {
        Ok(self.stream.local_addr()?)
    }

    /// Claims to be an SDK of protocol version `version` from now on.
    pub fn with_version(mut self, version: i32) -> RemotingConn {
        self.version = version;
        self
    }

    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// Sends a request and returns the response with the same opaque (skipping any
    /// server-initiated requests in between).
    pub fn request(&mut self, code: i32, ext: &[(&str, &str)], body: &[u8]) -> Result<Frame> {
        let opaque = self.next_opaque;
        self.next_opaque += 1;
        self.send_raw(&encode(&json_header_version(code, opaque, ext, self.version), body))?;
        loop {
            let f = self.read_frame().with_context(|| format!("waiting for the response to code {code}"))?;
            if f.is_response() && f.opaque() == opaque as i64 {
                return Ok(f);
            }
        }
    }

    /// GET_ROUTEINFO_BY_TOPIC round trip; the caller checks the code.
    pub fn route(&mut self, topic: &str) -> Result<Frame> {
        self.request(GET_ROUTEINFO_BY_TOPIC, &[("topic", topic)], b"")
    }

    /// SEND_MESSAGE of one message to `queue_id`, with a KEYS property; fails unless
    /// the broker answers 0.
    pub fn send_message(&mut self, topic: &str, queue_id: u32, key: &str, body: &[u8]) -> Result<Frame> {
        let props = format!("KEYS\u{1}{key}\u{2}TAGS\u{1}TagA\u{2}WAIT\u{1}true\u{2}");
        let born = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis().to_string();
        let qid = queue_id.to_string();
        let ext = [
            ("producerGroup", "rmq_e2e_pg"),
            ("topic", topic),
            ("defaultTopic", "TBW102"),
            ("defaultTopicQueueNums", "4"),
            ("queueId", qid.as_str()),
            ("sysFlag", "0"),
            ("bornTimestamp", born.as_str()),
            ("flag", "0"),
            ("properties", props.as_str()),
            ("reconsumeTimes", "0"),
            ("unitMode", "false"),
            ("batch", "false"),
        ];
        let resp = self.request(SEND_MESSAGE, &ext, body)?;
        ensure!(resp.code() == 0, "SEND_MESSAGE answered {} {:?}", resp.code(), resp.remark());
        Ok(resp)
    }

    /// PULL_MESSAGE (no suspend) of up to 64 messages from `queue_id` at `offset`;
    /// returns the decoded messages (none when the broker answers "no new message").
    pub fn pull(&mut self, topic: &str, group: &str, queue_id: u32, offset: u64) -> Result<Vec<StoredMessage>> {
        let (qid, off) = (queue_id.to_string(), offset.to_string());
        let ext = [
            ("consumerGroup", group),
            ("topic", topic),
            ("queueId", qid.as_str()),
            ("queueOffset", off.as_str()),
            ("maxMsgNums", "64"),
            ("sysFlag", "4"),
            ("commitOffset", "0"),
            ("suspendTimeoutMillis", "0"),
            ("subscription", "*"),
            ("subVersion", "0"),
            ("expressionType", "TAG"),
        ];
        let resp = self.request(PULL_MESSAGE, &ext, b"")?;
        match resp.code() {
            0 => decode_messages(&resp.body),
            19..=21 => Ok(Vec::new()), // PULL_NOT_FOUND, PULL_RETRY_IMMEDIATELY, PULL_OFFSET_MOVED
            c => bail!("PULL_MESSAGE answered {c} {:?}", resp.remark()),
        }
    }

    /// Every message stored in `topic` (queues 0..queues), read with PULL_MESSAGE.
    pub fn pull_all(&mut self, topic: &str, group: &str, queues: u32) -> Result<Vec<StoredMessage>> {
        let mut all = Vec::new();
        for q in 0..queues {
            let mut offset = 0;
            loop {
                let batch = self.pull(topic, group, q, offset)?;
                let Some(last) = batch.last() else { break };
                offset = last.queue_offset + 1;
                all.extend(batch);
            }
        }
        Ok(all)
    }

    /// Asks the name server (this connection) how many read queues `topic` has.
    pub fn read_queue_nums(&mut self, topic: &str) -> Result<u32> {
        let r = self.route(topic)?;
        ensure!(r.code() == 0, "GET_ROUTEINFO_BY_TOPIC {topic} answered {} {:?}", r.code(), r.remark());
        let route: Value = serde_json::from_slice(&r.body).context("parse the route JSON")?;
        route["queueDatas"]
            .as_array()
            .and_then(|q| q.iter().filter_map(|d| d["readQueueNums"].as_u64()).max())
            .map(|n| n as u32)
            .context("no queueDatas[].readQueueNums in the route")
    }

    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<()> {
        self.stream.write_all(bytes).context("write to the remoting connection")
    }

    pub fn read_frame(&mut self) -> Result<Frame> {
        let mut len = [0u8; 4];
        self.stream.read_exact(&mut len).context("read frame length")?;
        let total = i32::from_be_bytes(len);
        ensure!((4..=64 << 20).contains(&total), "implausible frame length {total}");
        let mut data = vec![0u8; total as usize];
        self.stream.read_exact(&mut data).context("read frame")?;
        let mark = u32::from_be_bytes(data[..4].try_into().unwrap());
        let (stype, hlen) = (mark >> 24, (mark & 0xff_ffff) as usize);
        ensure!(stype == 0, "serialize type {stype} (only JSON headers are decoded here)");
        ensure!(4 + hlen <= data.len(), "header length {hlen} exceeds frame length {total}");
        let header: Value = serde_json::from_slice(&data[4..4 + hlen]).context("parse JSON header")?;
        Ok(Frame { header, body: data[4 + hlen..].to_vec() })
    }

    /// Waits for the peer to close (EOF or reset), discarding any bytes; returns how
    /// long it took. Fails if the connection is still open after `limit`.
    pub fn expect_closed_within(&mut self, limit: Duration) -> Result<Closed> {
        expect_closed_within(&mut self.stream, limit)
    }
}

/// A message as the broker stores it (MessageDecoder.decodes).
#[derive(Debug, Clone)]
pub struct StoredMessage {
    pub queue_id: i32,
    pub queue_offset: u64,
    pub topic: String,
    pub body: Vec<u8>,
    pub properties: std::collections::BTreeMap<String, String>,
}

impl StoredMessage {
    pub fn keys(&self) -> Option<&str> {
        self.properties.get("KEYS").map(String::as_str)
    }
}

/// Decodes a PULL_MESSAGE response body (a run of stored message records).
pub fn decode_messages(mut b: &[u8]) -> Result<Vec<StoredMessage>> {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Result<&'a [u8]> {
        ensure!(b.len() >= n, "message record truncated");
        let (h, t) = b.split_at(n);
        *b = t;
        Ok(h)
    }
    fn i32_(b: &mut &[u8]) -> Result<i32> {
        Ok(i32::from_be_bytes(take(b, 4)?.try_into()?))
    }
    fn i64_(b: &mut &[u8]) -> Result<i64> {
        Ok(i64::from_be_bytes(take(b, 8)?.try_into()?))
    }
    let mut out = Vec::new();
    while b.len() >= 4 {
        let size = i32::from_be_bytes(b[..4].try_into()?) as usize;
        let mut r = take(&mut b, size)?;
        take(&mut r, 4)?; // store size
        let magic = i32_(&mut r)?;
        take(&mut r, 4)?; // body CRC
        let queue_id = i32_(&mut r)?;
        take(&mut r, 4)?; // flag
        let queue_offset = i64_(&mut r)? as u64;
        take(&mut r, 8)?; // physical offset
        let sys_flag = i32_(&mut r)?;
        take(&mut r, 8)?; // born timestamp
        take(&mut r, if sys_flag & (1 << 4) != 0 { 20 } else { 8 })?; // born host + port
        take(&mut r, 8)?; // store timestamp
        take(&mut r, if sys_flag & (1 << 5) != 0 { 20 } else { 8 })?; // store host + port
        take(&mut r, 4 + 8)?; // reconsume times, prepared transaction offset
        let blen = i32_(&mut r)? as usize;
        let body = take(&mut r, blen)?.to_vec();
        let tlen = if magic == -626843477 {
            i16::from_be_bytes(take(&mut r, 2)?.try_into()?) as usize
        } else {
            take(&mut r, 1)?[0] as usize
        };
        let topic = String::from_utf8_lossy(take(&mut r, tlen)?).into_owned();
        let plen = i16::from_be_bytes(take(&mut r, 2)?.try_into()?) as usize;
        let props = String::from_utf8_lossy(take(&mut r, plen)?).into_owned();
        let properties = props
            .split('\u{2}')
            .filter_map(|kv| kv.split_once('\u{1}'))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        out.push(StoredMessage { queue_id, queue_offset, topic, body, properties });
    }
    Ok(out)
}

/// How a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseKind {
    Eof,
    Reset,
}

#[derive(Debug, Clone, Copy)]
pub struct Closed {
    pub kind: CloseKind,
    pub after: Duration,
}

pub fn expect_closed_within(stream: &mut TcpStream, limit: Duration) -> Result<Closed> {
    let t0 = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        let left = limit.saturating_sub(t0.elapsed());
        if left.is_zero() {
            bail!("the connection is still open after {limit:?} (expected the agent to close it)");
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut buf) {
            Ok(0) => return Ok(Closed { kind: CloseKind::Eof, after: t0.elapsed() }),
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe) => {
                return Ok(Closed { kind: CloseKind::Reset, after: t0.elapsed() })
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(e) => return Err(e).context("read while waiting for the close"),
        }
    }
}
