//! Real frames captured from the peers (tests/fixtures/README.md): decode, check what the agent
//! reads, and check a JSON header re-encodes to one that decodes to the same Header.

use rmq_agent::codec::{
    decode_frame, decode_header, encode_frame, encode_json_header, request_code_name, FrameScanner,
    Header, Limits, SerializeType,
};

fn fixture(name: &str) -> Vec<u8> {
    let p = format!("{}/tests/fixtures/{name}.bin", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&p).unwrap_or_else(|e| panic!("{p}: {e}"))
}

struct Frame {
    raw: Vec<u8>,
    h: Header,
    body: Vec<u8>,
}

fn decode(name: &str) -> Frame {
    let raw = fixture(name);
    let (h, range) =
        decode_frame(&raw, &Limits::default()).unwrap_or_else(|e| panic!("{name}: {e}"));
    let body = raw[range].to_vec();
    if h.serialize_type == SerializeType::Json {
        // Not byte-identical (field order, number-valued ext fields), but the same Header.
        let again = decode_header(SerializeType::Json, &encode_json_header(&h)).unwrap();
        assert_eq!(again, h, "{name}: JSON re-encode changed the header");
    }
    // A whole re-encoded frame round-trips too (binary: the codes here fit an i16).
    let (h2, r2) = decode_frame(&encode_frame(&h, &body), &Limits::default()).unwrap();
    assert_eq!((&h2, r2.len()), (&h, body.len()), "{name}");
    Frame { raw, h, body }
}

fn header_text(f: &Frame) -> &str {
    let hl = u32::from_be_bytes(f.raw[4..8].try_into().unwrap()) & 0xff_ffff;
    std::str::from_utf8(&f.raw[8..8 + hl as usize]).unwrap()
}

fn check(h: &Header, code: i32, opaque: i32, response: bool, oneway: bool) {
    assert_eq!(
        (h.code, h.opaque, h.is_response(), h.is_oneway()),
        (code, opaque, response, oneway),
        "{h:?}"
    );
}

#[test]
fn rust_json_route_request_and_response() {
    let req = decode("rust_json_route_request");
    check(&req.h, 105, 0, false, false);
    assert_eq!(
        request_code_name(req.h.code),
        Some("GET_ROUTEINFO_BY_TOPIC")
    );
    assert_eq!((req.h.language.as_str(), req.h.version), ("RUST", 474));
    assert_eq!(req.h.remark, None); // "remark":null
    assert_eq!(
        req.h.ext_fields,
        vec![("topic".to_owned(), "PeerTestTopic".to_owned())]
    );
    assert!(req.body.is_empty());

    let resp = decode("rust_json_route_response");
    check(&resp.h, 0, 0, true, false);
    assert!(resp.h.ext_fields.is_empty()); // "extFields":null
    let route: serde_json::Value = serde_json::from_slice(&resp.body).unwrap();
    assert_eq!(
        route["brokerDatas"][0]["brokerAddrs"]["0"],
        "127.0.0.1:20911"
    );
}

#[test]
fn cpp_route_request() {
    let f = decode("cpp_route_request");
    check(&f.h, 105, 1, false, false);
    assert!(
        header_text(&f).ends_with("}\n"),
        "cpp ends its JSON header with a newline"
    );
    assert_eq!((f.h.language.as_str(), f.h.version), ("CPP", 63));
    assert_eq!(f.h.remark.as_deref(), Some("")); // cpp sends "" rather than null
    assert_eq!(f.h.ext("topic"), Some("TBW102"));
    assert_eq!(f.h.ext("AccessKey"), Some(""));
    assert_eq!(f.h.ext("OnsChannel"), Some("ALIYUN"));
    assert_eq!(f.h.ext("Signature").map(str::len), Some(28)); // base64 HMAC-SHA1
}

#[test]
fn cpp_send_message() {
    let f = decode("cpp_send_message");
    check(&f.h, 10, 2, false, false);
    assert!(header_text(&f).ends_with("}\n"));
    assert!(
        header_text(&f).contains("\"queueId\":0,"),
        "fixture has a numeric ext value"
    );
    assert_eq!(f.h.ext("Signature"), Some("2+ug+mdHP5VLAhRec9955UfYDQs="));
    assert_eq!(f.h.ext("AccessKey"), Some(""));
    // Numbers arrive as JSON numbers and come out as their text.
    assert_eq!(f.h.ext("queueId"), Some("0"));
    assert_eq!(f.h.ext("defaultTopicQueueNums"), Some("4"));
    assert_eq!(f.h.ext("sysFlag"), Some("0"));
    assert_eq!(f.h.ext("batch"), Some("0"));
    assert_eq!(f.h.ext("bornTimestamp"), Some("1795412348123"));
    // \u0001 / \u0002 escapes are the message-property separators.
    let props = f.h.ext("properties").unwrap();
    assert!(
        props.starts_with("UNIQ_KEY\u{1}") && props.ends_with("WAIT\u{1}true\u{2}"),
        "{props:?}"
    );
    // Wire order is kept.
    let keys: Vec<_> =
        f.h.ext_fields
            .iter()
            .map(|(k, _)| k.as_str())
            .take(4)
            .collect();
    assert_eq!(keys, ["AccessKey", "OnsChannel", "Signature", "batch"]);
    assert_eq!(f.body, b"warmup 1d5e47e0");

    let r = decode("cpp_send_message_response");
    check(&r.h, 0, 2, true, false);
    assert_eq!(r.h.ext("msgId"), Some("7F000001000051AF0000000000000000"));
    assert_eq!(r.h.ext("queueOffset"), Some("0"));
}

#[test]
fn cpp_heart_beat() {
    let f = decode("cpp_heart_beat");
    check(&f.h, 34, 3, false, false);
    assert_eq!(f.h.ext_fields.len(), 3); // only the signature fields
    assert!(
        f.body.ends_with(b"}\n"),
        "cpp's heartbeat body ends with a newline too"
    );
    let hb: serde_json::Value = serde_json::from_slice(&f.body).unwrap();
    assert_eq!(hb["producerDataSet"][0]["groupName"], "py_pg_1d5e47e0");

    let r = decode("cpp_heart_beat_response");
    check(&r.h, 0, 3, true, false);
    assert_eq!(r.h.ext("IS_SUPPORT_HEART_BEAT_V2"), Some("true"));
}

#[test]
fn cpp_pull_and_found_response() {
    let f = decode("cpp_pull_message");
    check(&f.h, 11, 17, false, false);
    assert_eq!(f.h.ext("consumerGroup"), Some("py_cg_1d5e47e0"));
    assert_eq!(f.h.ext("sysFlag"), Some("6")); // commitOffset + suspend, as a JSON number
    assert_eq!(f.h.ext("maxMsgNums"), Some("32"));
    assert_eq!(f.h.ext("suspendTimeoutMillis"), Some("15000"));
    assert_eq!(f.h.ext("subscription"), Some("*"));

    let r = decode("cpp_pull_found_response");
    check(&r.h, 0, 17, true, false);
    assert_eq!(r.h.remark.as_deref(), Some("Some(Found)")); // rocketmq-rust leaks Debug text
    assert_eq!(r.h.ext("nextBeginOffset"), Some("1"));
    // Body = stored messages; the first i32 is the first message's total size.
    let first = u32::from_be_bytes(r.body[..4].try_into().unwrap()) as usize;
    assert_eq!(first, r.body.len());
}

#[test]
fn rust_binary_headers() {
    let f = decode("rust_binary_pull_message");
    assert_eq!(f.h.serialize_type, SerializeType::RocketMq);
    check(&f.h, 11, 23, false, false);
    assert_eq!((f.h.language.as_str(), f.h.version), ("RUST", 474));
    assert_eq!(f.h.remark, None);
    assert_eq!(f.h.ext("bname"), Some("broker-a"));
    assert_eq!(f.h.ext("expressionType"), Some("TAG"));
    assert_eq!(f.h.ext("queueId"), Some("2"));
    // A zero-length value (Java would read it as null).
    assert_eq!(f.h.ext("subscription"), Some(""));
    assert_eq!(
        f.h.ext_fields.last().map(|(k, _)| k.as_str()),
        Some("topic")
    );

    let o = decode("rust_binary_update_offset_oneway");
    assert_eq!(o.h.serialize_type, SerializeType::RocketMq);
    check(&o.h, 15, 36, false, true);
    assert_eq!(o.h.ext("commitOffset"), Some("4"));
}

#[test]
fn broker_initiated_notify() {
    let f = decode("broker_notify_consumer_ids_changed");
    check(&f.h, 40, 5, false, true);
    assert_eq!(
        request_code_name(f.h.code),
        Some("NOTIFY_CONSUMER_IDS_CHANGED")
    );
    assert_eq!(f.h.ext("consumerGroup"), Some("py_cg_1d5e47e0"));
}

/// All fixtures back to back, scanned one byte at a time, the way a slow peer would send them.
#[test]
fn fixture_stream_byte_by_byte() {
    let names = [
        "cpp_route_request",
        "cpp_send_message",
        "rust_binary_pull_message",
        "cpp_pull_found_response",
        "broker_notify_consumer_ids_changed",
        "rust_json_route_response",
    ];
    let stream: Vec<u8> = names.iter().flat_map(|n| fixture(n)).collect();
    let mut s = FrameScanner::new(Limits::default());
    let (mut buf, mut frames, mut forwarded) = (Vec::new(), Vec::new(), 0);
    for b in &stream {
        buf.push(*b);
        let out = s.scan(&buf, &mut frames);
        assert_eq!(out.error, None);
        forwarded += out.consumed;
        buf.drain(..out.consumed);
    }
    assert_eq!((forwarded, s.mid_frame()), (stream.len(), None));
    let codes: Vec<_> = frames.iter().map(|f| f.header.code).collect();
    assert_eq!(codes, [105, 10, 11, 0, 40, 0]);
}
