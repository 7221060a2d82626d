//! Pop with two brokers: Pop-native clients through the agent, acknowledgements routed
//! to the broker that served the pop, and converted consumption that goes on when one
//! broker hangs. The lab's second broker address (10.200.2.3, "down" elsewhere) gets a
//! real second broker (`broker-b`) registered with the same name server.
rmq_e2e::sandboxed_test_binary!();

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use rmq_e2e::agent::{Agent, AgentOptions};
use rmq_e2e::frames::{decode_messages, Frame, RemotingConn};
use rmq_e2e::group::{create_topic, set_consume_mode};
use rmq_e2e::lab::{Lab, DOWN_BROKER_V4};
use rmq_e2e::peers::Peers;
use rmq_e2e::sdk::{self, Sdk, SdkOptions};

const POP_MESSAGE: i32 = 200050;
const ACK_MESSAGE: i32 = 200051;
const BATCH_ACK_MESSAGE: i32 = 200151;

fn two_brokers(lab: &Lab) -> Result<(Peers<'_>, Peers<'_>)> {
    let a = Peers::start(lab)?;
    let b = Peers::start_broker(lab, IpAddr::V4(DOWN_BROKER_V4), "broker-b", a.namesrv())?;
    Ok((a, b))
}

fn agent_args(args: &[&str]) -> AgentOptions {
    AgentOptions { extra_args: args.iter().map(|s| s.to_string()).collect(), ..Default::default() }
}

/// The Rust SDK in POP mode (its group switched with SET_MESSAGE_REQUEST_MODE on both
/// brokers) produces and consumes through the agent with nothing converted. Its pops are
/// relayed, the agent records which broker served each, and every acknowledgement it
/// sends finds its pop and goes to the broker that served it.
#[test]
fn pop_native_sdk_acks_go_to_the_broker_that_served_the_pop() -> Result<()> {
    const N: usize = 40;
    let lab = Lab::up("pnat")?;
    let (a, b) = two_brokers(&lab)?;
    let agent = Agent::start(&lab, agent_args(&["--convert", "none"]))?;
    lab.capture_pod(None)?;
    for broker in [a.broker(), b.broker()] {
        create_topic(&lab.brk(), broker, "POP_NATIVE", 2)?;
        set_consume_mode(&lab.brk(), broker, "POP_NATIVE", "g_native", "POP")?;
    }
    let opts = SdkOptions { group: Some("g_native".into()), mode: "pop".into(), ..SdkOptions::push("POP_NATIVE", N) };
    let run = sdk::run(Sdk::Rust, &lab.pod(), a.namesrv(), &opts, lab.workdir())?;
    run.ensure_passed()?;

    let log = agent.log()?;
    let pops_to = |broker: SocketAddr| log.requests("POP_MESSAGE").filter(|l| l.field_addr("orig_dst") == Some(broker) && l.field("response_code").as_deref() == Some("0")).count();
    let (pops_a, pops_b) = (pops_to(a.broker()), pops_to(b.broker()));
    let m = agent.metrics()?;
    let acks = |result: &str| m.get("rmq_agent_pop_native_acks_total", &[("kind", "ack"), ("result", result)]);
    let (direct, rerouted, unknown, failed) = (acks("direct"), acks("rerouted"), acks("unknown"), acks("reroute_failed"));
    let recorded = m.get("rmq_agent_pop_requests_total", &[("kind", "native_pop")]);
    let by_code: Vec<String> = ["POP_MESSAGE", "ACK_MESSAGE", "BATCH_ACK_MESSAGE", "CHANGE_MESSAGE_INVISIBLETIME"]
        .iter()
        .map(|c| format!("{c}={}", m.get("rmq_agent_requests_total", &[("code", c)])))
        .collect();
    println!(
        "POP-NATIVE REPORT: consumed {}/{N} (sent {:?}); pops answered with messages: broker-a {pops_a}, broker-b {pops_b}; \
         pops recorded {recorded}; acked messages direct={direct} rerouted={rerouted} unknown={unknown} failed={failed}; requests {by_code:?}",
        run.unique().unwrap_or(0),
        run.sent()
    );
    ensure!(pops_a > 0 && pops_b > 0, "the SDK should have popped from both brokers: a={pops_a} b={pops_b}");
    ensure!(recorded >= (pops_a + pops_b) as f64, "the agent recorded {recorded} pops, the log shows {} answered", pops_a + pops_b);
    // Every message consumed was acknowledged once at least, to the broker that served it.
    ensure!(direct >= N as f64, "only {direct} acknowledgements found their pop's broker on their own connection (want >= {N})");
    ensure!(unknown == 0.0 && failed == 0.0, "acknowledgements the agent could not route: unknown={unknown} failed={failed}");
    ensure!(rerouted == 0.0, "the SDK addressed each broker itself; nothing should have been rerouted ({rerouted})");
    Ok(())
}

/// One message a raw POP handed out, with what a client needs to acknowledge it
/// (the handle a Java client builds, protocol.md §3.2).
#[derive(Debug, Clone)]
struct Popped {
    body: String,
    queue_id: i32,
    offset: u64,
    start_offset: u64,
    pop_time: i64,
    invisible: i64,
    revive_qid: i64,
}

impl Popped {
    fn extra_info(&self, broker_name: &str) -> String {
        format!("{} {} {} {} 0 {broker_name} {} {}", self.start_offset, self.pop_time, self.invisible, self.revive_qid, self.queue_id, self.offset)
    }
}

fn ext<'a>(f: &'a Frame, k: &str) -> Option<&'a str> {
    f.header["extFields"][k].as_str()
}

/// POP_MESSAGE (queueId -1) on `conn`; the messages it returned, if any.
fn pop(conn: &mut RemotingConn, topic: &str, group: &str, invisible_ms: u64, poll_ms: u64) -> Result<Vec<Popped>> {
    let born = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis().to_string();
    let (inv, poll) = (invisible_ms.to_string(), poll_ms.to_string());
    let hdr = [
        ("consumerGroup", group),
        ("topic", topic),
        ("queueId", "-1"),
        ("maxMsgNums", "32"),
        ("invisibleTime", inv.as_str()),
        ("pollTime", poll.as_str()),
        ("bornTime", born.as_str()),
        ("initMode", "0"),
        ("expType", "TAG"),
        ("exp", "*"),
        ("order", "false"),
    ];
    let r = conn.request(POP_MESSAGE, &hdr, b"")?;
    if r.code() != 0 {
        return Ok(Vec::new()); // 208/209/210: nothing to pop now
    }
    let num = |k: &str| -> Result<i64> { ext(&r, k).with_context(|| format!("POP answer without {k}"))?.parse().context(k.to_string()) };
    let (pop_time, invisible, revive_qid) = (num("popTime")?, num("invisibleTime")?, num("reviveQid")?);
    let start: Vec<(String, u64)> = ext(&r, "startOffsetInfo")
        .unwrap_or("")
        .split(';')
        .filter_map(|e| {
            let p: Vec<&str> = e.split(' ').collect();
            (p.len() == 3).then(|| (format!("{}@{}", p[0], p[1]), p[2].parse().unwrap_or(0)))
        })
        .collect();
    decode_messages(&r.body)?
        .into_iter()
        .map(|m| {
            let key = format!("0@{}", m.queue_id);
            let start_offset = start.iter().find(|(k, _)| *k == key).map(|(_, o)| *o).unwrap_or(m.queue_offset);
            Ok(Popped { body: String::from_utf8_lossy(&m.body).into_owned(), queue_id: m.queue_id, offset: m.queue_offset, start_offset, pop_time, invisible, revive_qid })
        })
        .collect()
}

fn ack_header(group: &str, topic: &str, p: &Popped) -> Vec<(String, String)> {
    vec![
        ("consumerGroup".into(), group.into()),
        ("topic".into(), topic.into()),
        ("queueId".into(), p.queue_id.to_string()),
        ("extraInfo".into(), p.extra_info("broker-a")),
        ("offset".into(), p.offset.to_string()),
        ("bname".into(), "broker-a".into()),
    ]
}

fn request(conn: &mut RemotingConn, code: i32, ext: &[(String, String)], body: &[u8]) -> Result<Frame> {
    let e: Vec<(&str, &str)> = ext.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    conn.request(code, &e, body)
}

/// A Pop-native client pops from broker-a and then acknowledges on a connection to
/// broker-b (as after a route change): with single ACKs and with a BATCH_ACK. The
/// agent sends them to broker-a, so those messages never come back. A message acked
/// to broker-b without the agent (straight from the broker netns) comes back after
/// the invisible time, as does one never acked: the broker really did not get it.
#[test]
fn an_ack_sent_to_the_wrong_broker_reaches_the_one_that_served_the_pop() -> Result<()> {
    const TOPIC: &str = "POP_MISROUTE";
    const GROUP: &str = "g_misroute";
    let lab = Lab::up("pmis")?;
    let (a, b) = two_brokers(&lab)?;
    let mut agent = Agent::start(&lab, agent_args(&["--convert", "none"]))?;
    lab.capture_pod(None)?;
    for broker in [a.broker(), b.broker()] {
        create_topic(&lab.brk(), broker, TOPIC, 2)?;
    }
    let connect = |to: SocketAddr| lab.pod().run(move || -> Result<RemotingConn> { RemotingConn::new(TcpStream::connect_timeout(&to, Duration::from_secs(3))?) });
    let mut to_a = connect(a.broker())?;
    for i in 0..6u32 {
        to_a.send_message(TOPIC, i % 2, &format!("k{i}"), format!("mis i={i}").as_bytes())?;
    }
    let mut popped: Vec<Popped> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while popped.len() < 6 && Instant::now() < deadline {
        popped.extend(pop(&mut to_a, TOPIC, GROUP, 3000, 1000)?);
    }
    popped.sort_by(|x, y| x.body.cmp(&y.body));
    let bodies: Vec<&str> = popped.iter().map(|p| p.body.as_str()).collect();
    ensure!(bodies == ["mis i=0", "mis i=1", "mis i=2", "mis i=3", "mis i=4", "mis i=5"], "popped {bodies:?}");
    // A new agent takes over between the pops and the acks: the routes must move with it
    // (the counters below are the new agent's).
    let routes_before = agent.state()?["pop_ack_routes"].as_u64().unwrap_or(0);
    agent.upgrade()?;
    let routes_after = agent.state()?["pop_ack_routes"].as_u64().unwrap_or(0);
    ensure!(routes_before >= 1 && routes_after >= routes_before, "ack routes before the upgrade {routes_before}, after {routes_after}");

    // Through the agent, on a connection to broker-b: i=0 and i=1 by ACK_MESSAGE, i=2 and
    // i=3 in one BATCH_ACK (rocketmq-rust's body: bit sets as byte arrays).
    let mut to_b = connect(b.broker())?;
    for p in &popped[..2] {
        let r = request(&mut to_b, ACK_MESSAGE, &ack_header(GROUP, TOPIC, p), b"")?;
        ensure!(r.code() == 0, "misrouted ACK of {} answered {} {:?}", p.body, r.code(), r.remark());
    }
    let acks: Vec<serde_json::Value> = popped[2..4]
        .iter()
        .map(|p| {
            let bit = (p.offset - p.start_offset) as usize;
            let mut b = vec![0u8; (bit / 64 + 1) * 8];
            b[bit / 8] |= 1 << (bit % 8);
            serde_json::json!({"c": GROUP, "t": TOPIC, "r": "0", "so": p.start_offset, "q": p.queue_id, "rq": p.revive_qid, "pt": p.pop_time, "it": p.invisible, "b": b})
        })
        .collect();
    let body = serde_json::to_vec(&serde_json::json!({"acks": acks, "brokerName": "broker-a"}))?;
    let r = request(&mut to_b, BATCH_ACK_MESSAGE, &[], &body)?;
    ensure!(r.code() == 0, "misrouted BATCH_ACK answered {} {:?}", r.code(), r.remark());
    // i=4: the same mistake without the agent.
    let (b_addr, hdr) = (b.broker(), ack_header(GROUP, TOPIC, &popped[4]));
    let unrouted = lab.brk().run(move || -> Result<i64> { Ok(request(&mut RemotingConn::new(TcpStream::connect(b_addr)?)?, ACK_MESSAGE, &hdr, b"")?.code()) })?;
    // i=5 is never acknowledged.

    // After the invisible time the broker redelivers exactly what it did not get acked.
    let mut back: BTreeSet<String> = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(40);
    while Instant::now() < deadline && !(back.contains("mis i=4") && back.contains("mis i=5")) {
        back.extend(pop(&mut to_a, TOPIC, GROUP, 60_000, 2000)?.into_iter().map(|p| p.body));
    }
    // Give anything else that would come back the same chance.
    let settle = Instant::now() + Duration::from_secs(6);
    while Instant::now() < settle {
        back.extend(pop(&mut to_a, TOPIC, GROUP, 60_000, 2000)?.into_iter().map(|p| p.body));
    }
    let m = agent.metrics()?;
    let acks = |result: &str| m.get("rmq_agent_pop_native_acks_total", &[("kind", "ack"), ("result", result)]);
    println!(
        "POP-NATIVE REPORT misrouted: redelivered {back:?}; ack to broker-b without the agent answered {unrouted}; \
         agent acks rerouted={} direct={} unknown={} failed={}; ack routes before/after an upgrade {routes_before}/{routes_after}",
        acks("rerouted"), acks("direct"), acks("unknown"), acks("reroute_failed")
    );
    ensure!(back.contains("mis i=5"), "the never-acked message did not come back; the scenario proves nothing: {back:?}");
    ensure!(back.contains("mis i=4"), "the ack sent to broker-b without the agent should have been lost (answered {unrouted}): {back:?}");
    for i in 0..4 {
        ensure!(!back.contains(&format!("mis i={i}")), "mis i={i} came back: its misrouted ack did not reach broker-a ({back:?})");
    }
    ensure!(acks("rerouted") == 4.0, "the agent should have rerouted 4 acks, counted {}", acks("rerouted"));
    ensure!(acks("reroute_failed") == 0.0 && acks("unknown") == 0.0, "unrouted acks through the agent");
    Ok(())
}

/// Converted consumers of a topic on two brokers; broker-b hangs (SIGSTOP: its
/// connections stay open, it answers nothing). Once a POP to it times out the agent
/// passes it over: PULLs that keep arriving on the consumers' connections to
/// broker-b are served by POP on broker-a, and what is produced to broker-a
/// meanwhile is consumed promptly.
#[test]
fn converted_consumption_goes_on_when_a_broker_hangs() -> Result<()> {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    use rmq_e2e::group::{produce, Consumer};

    const TOPIC: &str = "POP_HANG";
    let lab = Lab::up("phang")?;
    let (a, b) = two_brokers(&lab)?;
    let agent = Agent::start(&lab, agent_args(&["--convert", "all", "--pop-invisible-ms", "20000"]))?;
    lab.capture_pod(None)?;
    for broker in [a.broker(), b.broker()] {
        create_topic(&lab.brk(), broker, TOPIC, 2)?;
    }
    let (pod, ns) = (lab.pod(), a.namesrv());
    let consumers = [
        Consumer::start(Sdk::Python, "py-a", &pod, ns, TOPIC, "g_hang", 150, &[], lab.workdir())?,
        Consumer::start(Sdk::Rust, "rs-b", &pod, ns, TOPIC, "g_hang", 150, &[], lab.workdir())?,
        Consumer::start(Sdk::Python, "py-c", &pod, ns, TOPIC, "g_hang", 150, &[], lab.workdir())?,
    ];
    std::thread::sleep(Duration::from_secs(12));
    let consumed = || rmq_e2e::group::received(&consumers);
    produce(&pod, ns, TOPIC, 20, "before", lab.workdir())?;
    let before = rmq_e2e::group::bodies_of("before", 20);
    rmq_e2e::lab::wait_for("the messages produced with both brokers up to be consumed", Duration::from_secs(40), || Ok(before.is_subset(&consumed()).then_some(())))?;

    let b_pid = Pid::from_raw(b.broker_pid()?);
    kill(b_pid, Signal::SIGSTOP)?;
    let hung_at = Instant::now();
    // A POP in flight to broker-b times out (its long-poll plus 5 s): the agent passes it over.
    let b_addr = b.broker();
    let passed_over = |log: &rmq_e2e::telemetry::AgentLog| log.with_message("POP failed; the broker is passed over for a while").filter(|l| l.field_addr("broker") == Some(b_addr)).count();
    let noticed = rmq_e2e::lab::wait_for("the agent to pass over the hung broker", Duration::from_secs(60), || Ok((passed_over(&agent.log()?) > 0).then(|| hung_at.elapsed())));
    let m0 = agent.metrics()?;
    // Produce to broker-a only (a producer would also try the hung broker).
    let a_addr = a.broker();
    let sent_at = Instant::now();
    pod.run(move || -> Result<()> {
        let mut c = RemotingConn::new(TcpStream::connect_timeout(&a_addr, Duration::from_secs(3))?)?;
        for i in 0..20u32 {
            c.send_message(TOPIC, i % 2, &format!("k{i}"), format!("during i={i}").as_bytes())?;
        }
        Ok(())
    })?;
    let during = rmq_e2e::group::bodies_of("during", 20);
    let waited = rmq_e2e::lab::wait_for("the messages produced to broker-a while broker-b hangs to be consumed", Duration::from_secs(30), || {
        Ok(during.is_subset(&consumed()).then(|| sent_at.elapsed()))
    });
    // PULLs the consumers keep sending on their connections to broker-b are served by broker-a.
    let elsewhere = rmq_e2e::lab::wait_for("PULLs addressed to the hung broker to be served by the other one", Duration::from_secs(30), || {
        let d = agent.metrics()?.get("rmq_agent_pop_requests_total", &[("kind", "pop_elsewhere")]) - m0.get("rmq_agent_pop_requests_total", &[("kind", "pop_elsewhere")]);
        Ok((d > 0.0).then_some(d))
    });
    let failures = passed_over(&agent.log()?);
    kill(b_pid, Signal::SIGCONT)?;
    let all = consumers.iter().map(|c| c.deliveries().len()).sum::<usize>();
    println!(
        "POP-NATIVE REPORT hung broker: passed over after {:?} ({failures} failed POPs to it in all); messages produced to broker-a then \
         consumed after {:?}; PULLs served by another broker than addressed since: {:?}; deliveries {all}",
        noticed.as_ref().ok(), waited.as_ref().ok(), elsewhere.as_ref().ok()
    );
    noticed?;
    waited?;
    elsewhere?;
    Ok(())
}

/// Evidence that the broker itself served POP and got the ACKs of a converted run: a
/// capture on the broker's interface counts the POPs the broker received, the messages it
/// acknowledged (ACK_MESSAGE, and the bit sets of BATCH_ACK_MESSAGE, answered 0) and the
/// CHANGE_INVISIBLETIME it accepted, and they equal the agent's own counters. Afterwards,
/// past the invisible time, the broker has nothing left to redeliver for the group:
/// every message it handed out was acknowledged.
#[test]
fn converted_pop_counters_agree_with_the_broker() -> Result<()> {
    use rmq_e2e::capture::Tcpdump;
    use rmq_e2e::group::{produce, Consumer};

    const TOPIC: &str = "POP_EVIDENCE";
    const N: usize = 60;
    let lab = Lab::up("pevd")?;
    let peers = Peers::start(&lab)?;
    let agent = Agent::start(&lab, agent_args(&["--convert", "all", "--pop-invisible-ms", "20000"]))?;
    lab.capture_pod(None)?;
    create_topic(&lab.brk(), peers.broker(), TOPIC, 2)?;
    let wire = Tcpdump::start(&lab.brk(), "eth0", peers.broker().port(), lab.workdir().join("broker.pcap"))?;
    let (pod, ns) = (lab.pod(), peers.namesrv());
    let mut consumers = vec![
        Consumer::start(Sdk::Python, "py-a", &pod, ns, TOPIC, "g_evd", 120, &[], lab.workdir())?,
        Consumer::start(Sdk::Rust, "rs-b", &pod, ns, TOPIC, "g_evd", 120, &[], lab.workdir())?,
    ];
    std::thread::sleep(Duration::from_secs(12));
    produce(&pod, ns, TOPIC, N, "evd", lab.workdir())?;
    let want = rmq_e2e::group::bodies_of("evd", N);
    rmq_e2e::lab::wait_for("every message to be consumed", Duration::from_secs(60), || Ok(want.is_subset(&rmq_e2e::group::received(&consumers)).then_some(())))?;
    // The SDKs commit every few seconds; then nothing is held.
    rmq_e2e::lab::wait_for("every receipt to be acknowledged", Duration::from_secs(30), || {
        Ok((agent.metrics()?.get("rmq_agent_pop_pending_receipts", &[]) == 0.0).then_some(()))
    })?;
    consumers.clear(); // kills them: their connections close
    std::thread::sleep(Duration::from_secs(3));
    let kinds = ["pop", "ack", "batch_ack", "change_invisible", "renew"];
    let count = |m: &rmq_e2e::telemetry::Metrics| kinds.map(|k| m.get("rmq_agent_pop_requests_total", &[("kind", k)]) as u64);
    let before = count(&agent.metrics()?);
    let w = wire.stop()?;
    let after = count(&agent.metrics()?);
    ensure!(before == after, "the agent was still sending requests while the capture stopped: {before:?} -> {after:?}");
    let [pops, acked, batches, changes, renewals] = after;
    let w_pops = w.requests(POP_MESSAGE as i64);
    // Messages acknowledged as the broker saw it: single ACKs answered 0, plus the bits of BATCH_ACKs answered 0.
    let w_acked = w.responses(ACK_MESSAGE as i64, 0) + w.batch_acked_messages;
    let (w_batches, w_changes) = (w.responses(BATCH_ACK_MESSAGE as i64, 0), w.responses(200053, 0));
    println!(
        "POP-NATIVE REPORT evidence: agent pop={pops} acked={acked} (batch_ack={batches}) change_invisible={changes} renew={renewals}; \
         broker received POP={w_pops} (answered found={} none={}), acknowledged messages={w_acked} (ACK ok={}, BATCH_ACK ok={w_batches} \
         carrying {}, BATCH_ACK refused={}), CHANGE_INVISIBLETIME ok={w_changes}; requests by code {:?}",
        w.responses(POP_MESSAGE as i64, 0),
        w.responses(POP_MESSAGE as i64, 210),
        w.responses(ACK_MESSAGE as i64, 0),
        w.batch_acked_messages,
        w.requests(BATCH_ACK_MESSAGE as i64) - w_batches,
        w.requests
    );
    ensure!(pops > 0 && acked >= N as u64, "the agent counted {pops} POPs and {acked} acknowledged messages for {N} messages");
    ensure!(w_pops == pops, "the broker received {w_pops} POP_MESSAGE, the agent counted {pops}");
    ensure!(w_acked == acked, "the broker acknowledged {w_acked} messages, the agent counted {acked}");
    ensure!(w_batches == batches, "the broker accepted {w_batches} BATCH_ACK_MESSAGE, the agent counted {batches}");
    ensure!(w_changes == changes + renewals, "the broker accepted {w_changes} CHANGE_INVISIBLETIME, the agent counted {changes} + {renewals} renewals");

    // The broker's own view: once the invisible time has passed, nothing of the group revives.
    std::thread::sleep(Duration::from_secs(25));
    let broker = peers.broker();
    let left = lab.brk().run(move || -> Result<Vec<String>> {
        let mut c = RemotingConn::new(TcpStream::connect(broker)?)?;
        let mut left = Vec::new();
        for _ in 0..3 {
            left.extend(pop(&mut c, TOPIC, "g_evd", 60_000, 2000)?.into_iter().map(|p| p.body));
        }
        Ok(left)
    })?;
    println!("POP-NATIVE REPORT evidence: the broker still had for g_evd after the invisible time: {left:?}");
    ensure!(left.is_empty(), "the broker redelivered {left:?}: some acknowledgement never took effect");
    Ok(())
}
