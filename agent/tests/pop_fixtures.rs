//! Pull→Pop logic against real frames from the rocketmq-rust compat broker and both SDKs
//! (tests/fixtures/README.md, "Pop fixtures").

use rmq_agent::codec::{decode_frame, Header, Limits};
use rmq_agent::pop::batch::{parse_batch, rewrite_queue_offset};
use rmq_agent::pop::heartbeat::{parse_heartbeat, ConsumeFromWhere, ConsumeType, MessageModel};
use rmq_agent::pop::policy::{ConvertPolicy, Decision};
use rmq_agent::pop::receipt::{parse_extra_info, receipts_from_pop, renewed};
use rmq_agent::pop::requests;

fn frame(name: &str) -> (Header, Vec<u8>) {
    let p = format!("{}/tests/fixtures/{name}.bin", env!("CARGO_MANIFEST_DIR"));
    let raw = std::fs::read(&p).unwrap_or_else(|e| panic!("{p}: {e}"));
    let (h, r) = decode_frame(&raw, &Limits::default()).unwrap_or_else(|e| panic!("{name}: {e}"));
    (h, raw[r].to_vec())
}

#[test]
fn heartbeats_from_both_sdks() {
    let (h, body) = frame("pop_cpp_heart_beat");
    assert_eq!((h.code, h.language.as_str()), (34, "CPP"));
    let cpp = parse_heartbeat(&body).unwrap();
    let c = &cpp.consumers[0];
    assert!(c.group_name.starts_with("py_cg_"));
    assert_eq!((&c.consume_type, &c.message_model), (&ConsumeType::Passively, &MessageModel::Clustering));
    assert_eq!(c.consume_from_where, ConsumeFromWhere::LastOffset);
    assert!(c.subscriptions.iter().any(|s| s.topic.starts_with("%RETRY%") && s.expression_type == "TAG"));
    let s = c.subscription("PeerTestTopic").unwrap();
    assert_eq!((s.sub_string.as_str(), s.sub_version > 0), ("*", true)); // subVersion sent as a string
    assert_eq!(ConvertPolicy::All.decide(c, false), Decision::Convert);

    let (h, body) = frame("pop_rust_heart_beat");
    assert_eq!(h.language, "RUST");
    let rs = parse_heartbeat(&body).unwrap();
    assert_eq!(rs.producers[0].group_name, "CLIENT_INNER_PRODUCER");
    let c = &rs.consumers[0];
    assert_eq!((&c.consume_type, &c.message_model), (&ConsumeType::Passively, &MessageModel::Clustering));
    assert_eq!(c.subscriptions.len(), 2);
    assert_eq!(ConvertPolicy::All.decide(c, true), Decision::PassThrough("orderly consumer (sent LOCK_BATCH_MQ)"));
}

#[test]
fn pop_request_is_what_we_build() {
    let (h, _) = frame("pop_request");
    let (ours, _) = requests::pop(h.opaque, "pop_fix_g", "PopFixTopic", -1, 32, 5000, 1000, 1, 0, "TAG", "*");
    for k in ["consumerGroup", "topic", "queueId", "maxMsgNums", "invisibleTime", "pollTime", "initMode", "expType", "exp", "order"] {
        assert_eq!(ours.ext(k), h.ext(k), "{k}");
    }
}

#[test]
fn normal_pop_response_builds_the_handles_the_broker_accepted() {
    let (resp, body) = frame("pop_response_normal");
    let rs = receipts_from_pop(&resp, &body, "broker-a", "PopFixTopic").unwrap();
    assert_eq!(rs.len(), 8);
    assert!(rs.iter().all(|(m, r)| m.property("POP_CK").is_none() && r.retry_flag == "0" && r.uniq_key.is_some()));
    // The first ACK of the capture used exactly the handle we build for that message.
    let (ack, _) = frame("pop_ack_request");
    let handle = ack.ext("extraInfo").unwrap();
    let (_, r) = rs.iter().find(|(_, r)| r.extra_info == handle).expect("same handle");
    let (ours, _) = requests::ack(ack.opaque, "pop_fix_g", r);
    for k in ["consumerGroup", "topic", "queueId", "extraInfo", "offset"] {
        assert_eq!(ours.ext(k), ack.ext(k), "{k}");
    }
    // So did CHANGE_INVISIBLETIME; its answer renews the handle at the message's own offset.
    let (cit, _) = frame("pop_change_invisible_request");
    let (_, r) = rs.iter().find(|(_, r)| Some(r.extra_info.as_str()) == cit.ext("extraInfo")).unwrap();
    let (ours, _) = requests::change_invisible(cit.opaque, "pop_fix_g", r, 1000);
    for k in ["consumerGroup", "topic", "queueId", "extraInfo", "offset", "invisibleTime"] {
        assert_eq!(ours.ext(k), cit.ext(k), "{k}");
    }
    let (cresp, _) = frame("pop_change_invisible_response");
    let n = renewed(r, &cresp).unwrap();
    let e = parse_extra_info(&n.extra_info).unwrap();
    assert_eq!((e.ck_queue_offset, e.queue_offset, e.invisible_time), (r.queue_offset, r.queue_offset, 1000));
    assert_eq!(e.pop_time.to_string(), cresp.ext("popTime").unwrap());
}

#[test]
fn mixed_pop_response_keeps_broker_pop_ck() {
    let (resp, mut body) = frame("pop_response_mixed");
    let rs = receipts_from_pop(&resp, &body, "broker-a", "PopMixTopic").unwrap();
    assert_eq!(rs.len(), 10);
    let (revived, fresh): (Vec<_>, Vec<_>) = rs.iter().partition(|(m, _)| m.property("POP_CK").is_some());
    assert_eq!((revived.len(), fresh.len()), (4, 6));
    for (m, r) in &revived {
        // Relabelled with the original topic; the handle is the broker's 9-field POP_CK.
        assert_eq!(m.topic, "PopMixTopic");
        assert_eq!(r.extra_info, m.property("POP_CK").unwrap());
        assert_eq!(parse_extra_info(&r.extra_info).unwrap().extra.len(), 1);
        assert_eq!((r.retry_flag.as_str(), r.reconsume_times), ("1", 1));
        assert_eq!(r.ack_topic("pop_mix_g"), "%RETRY%pop_mix_g_PopMixTopic");
        let (ack, _) = requests::ack(1, "pop_mix_g", r);
        assert_eq!(ack.ext("topic"), Some("%RETRY%pop_mix_g_PopMixTopic"));
    }
    for (_, r) in &fresh {
        assert_eq!(r.ack_topic("pop_mix_g"), "PopMixTopic");
        assert!(r.extra_info.starts_with(&format!("{} {} ", r.ck_queue_offset().unwrap(), resp.ext("popTime").unwrap())));
    }
    // The capture's ACKs for the revived messages used the POP_CK handles and the retry topic.
    let (ack, _) = frame("pop_ack_retry_request");
    assert!(ack.ext("topic").unwrap().starts_with("%RETRY%"));
    // Fabricated offsets go in place and nothing else moves.
    let before = parse_batch(&body).unwrap();
    for (i, (m, _)) in rs.iter().enumerate() {
        rewrite_queue_offset(&mut body, m, 500 + i as i64).unwrap();
    }
    let after = parse_batch(&body).unwrap();
    for (i, (a, b)) in before.iter().zip(&after).enumerate() {
        assert_eq!(b.queue_offset, 500 + i as i64);
        assert_eq!((&a.range, &a.topic, &a.properties, a.commit_log_offset), (&b.range, &b.topic, &b.properties, b.commit_log_offset));
    }
    // The agent's PULL answer carries the rewritten batch.
    let (ph, pb) = requests::pull_found(7, 510, 0, 510, &body);
    assert_eq!((ph.code, ph.ext("nextBeginOffset"), pb.len()), (0, Some("510"), body.len()));
}

#[test]
fn pull_found_responses_walk_and_match_our_header_shape() {
    for name in ["pop_cpp_pull_found_response", "pop_rust_pull_found_response"] {
        let (h, body) = frame(name);
        let msgs = parse_batch(&body).unwrap();
        assert!(!msgs.is_empty(), "{name}");
        assert_eq!(msgs.last().unwrap().range.end, body.len());
        let (ours, _) = requests::pull_found(h.opaque, 1, 0, 1, &body);
        for k in ["nextBeginOffset", "minOffset", "maxOffset", "suggestWhichBrokerId"] {
            assert!(h.ext(k).is_some() && ours.ext(k).is_some(), "{name} {k}");
        }
    }
}

#[test]
fn pop_native_ack_routes_cover_every_handle_of_a_real_pop() {
    use rmq_agent::pop::ackroute::{key_from_request, keys_from_pop, AckRoutes};
    let served_by: std::net::SocketAddr = "10.200.2.2:10911".parse().unwrap();
    // The capture's ACK and CHANGE_INVISIBLETIME of the normal pop find its route.
    let (resp, _) = frame("pop_response_normal");
    let (keys, invisible) = keys_from_pop("pop_fix_g", "PopFixTopic", &resp).unwrap();
    let mut routes = AckRoutes::new();
    for k in keys {
        routes.insert(k, served_by, 0, invisible);
    }
    for name in ["pop_ack_request", "pop_change_invisible_request"] {
        let (req, _) = frame(name);
        assert_eq!(routes.lookup(&key_from_request(&req).unwrap(), 1), Some(served_by), "{name}");
    }
    // Every handle a client builds from the mixed pop (fresh and revived, with the broker's
    // 9-field POP_CK) maps to one of its routes.
    let (resp, body) = frame("pop_response_mixed");
    let (keys, _) = keys_from_pop("pop_mix_g", "PopMixTopic", &resp).unwrap();
    for (_, r) in receipts_from_pop(&resp, &body, "broker-a", "PopMixTopic").unwrap() {
        let (ack, _) = requests::ack(1, "pop_mix_g", &r);
        let k = key_from_request(&ack).unwrap();
        assert!(keys.contains(&k), "handle {} ({k:?}) not among {keys:?}", r.extra_info);
    }
}
