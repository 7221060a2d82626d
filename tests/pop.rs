//! Pull→Pop conversion with unmodified SDKs. Six consumers of one group (three
//! Python/C++, three Rust) on a topic with two queues:
//! - relayed unconverted, the classic SDKs split the two queues between two of them
//!   and the other four get nothing;
//! - with `--convert all`, the agent serves their PULLs with broker-side POP and
//!   every consumer receives messages.
//! Every produced message is consumed in both runs; duplicates and Jain's fairness
//! index are reported.
rmq_e2e::sandboxed_test_binary!();

use std::time::Duration;

use anyhow::{ensure, Result};
use rmq_e2e::agent::{Agent, AgentOptions};
use rmq_e2e::group::{bodies_of, create_topic, produce, received, Consumer, GroupReport};
use rmq_e2e::lab::Lab;
use rmq_e2e::peers::Peers;
use rmq_e2e::sdk::Sdk;

const MESSAGES: usize = 120;
const CONSUME_SECONDS: u64 = 45;

fn run_group(lab: &Lab, peers: &Peers, topic: &str, group: &str, prefix: &str) -> Result<GroupReport> {
    create_topic(&lab.brk(), peers.broker(), topic, 2)?;
    let mut consumers = Vec::new();
    for i in 0..6 {
        let sdk = if i % 2 == 0 { Sdk::Python } else { Sdk::Rust };
        let name = format!("{}{i}", if sdk == Sdk::Python { "py" } else { "rs" });
        consumers.push(Consumer::start(sdk, &name, &lab.pod(), peers.namesrv(), topic, group, CONSUME_SECONDS, &[], lab.workdir())?);
    }
    // Let every consumer register and rebalance before anything is sent.
    std::thread::sleep(Duration::from_secs(12));
    produce(&lab.pod(), peers.namesrv(), topic, MESSAGES, prefix, lab.workdir())?;
    for c in consumers.iter_mut() {
        c.wait(Duration::from_secs(CONSUME_SECONDS + 30))?;
    }
    Ok(GroupReport::new(&consumers, prefix))
}

#[test]
fn six_consumers_share_two_queues_only_when_converted() -> Result<()> {
    let lab = Lab::up("pop")?;
    let peers = Peers::start(&lab)?;

    let mut agent = Agent::start(&lab, AgentOptions::default())?;
    lab.capture_pod(None)?;
    let plain = run_group(&lab, &peers, "POP_PLAIN", "g_plain", "plain")?;
    agent.stop()?;

    let convert = vec!["--convert".into(), "all".into(), "--pop-invisible-ms".into(), "20000".into()];
    let agent = Agent::start(&lab, AgentOptions { extra_args: convert, ..Default::default() })?;
    let popped = run_group(&lab, &peers, "POP_CONV", "g_conv", "conv")?;

    for (name, r) in [("pass-through", &plain), ("converted", &popped)] {
        println!(
            "POP REPORT {name}: per_consumer={:?} active={} unique={}/{MESSAGES} deliveries={} duplicates={} fairness={:.3}",
            r.per_consumer, r.active(), r.unique.len(), r.deliveries, r.duplicates(), r.fairness()
        );
    }
    ensure!(plain.unique.len() == MESSAGES, "pass-through lost messages: {}/{MESSAGES}", plain.unique.len());
    ensure!(plain.active() == 2, "pass-through: a 2-queue topic should feed exactly 2 of 6 consumers, fed {}", plain.active());
    ensure!(popped.unique.len() == MESSAGES, "converted lost messages: {}/{MESSAGES}", popped.unique.len());
    ensure!(popped.active() == 6, "converted: all 6 consumers should receive messages: {:?}", popped.per_consumer);

    // Evidence from the agent that the broker really served POP and ACK.
    let m = agent.metrics()?;
    let pops = m.get("rmq_agent_pop_requests_total", &[("kind", "pop")]);
    let acks = m.get("rmq_agent_pop_requests_total", &[("kind", "ack")]);
    let delivered = m.get("rmq_agent_pop_messages_total", &[]);
    let by_kind: Vec<String> = m.named("rmq_agent_pop_requests_total").map(|s| format!("{}={}", s.labels.get("kind").cloned().unwrap_or_default(), s.value)).collect();
    println!("POP REPORT agent: pop_requests={pops} acks={acks} messages_delivered={delivered} by_kind={by_kind:?}");
    ensure!(pops > 0.0 && acks > 0.0, "the agent sent no POP or no ACK");
    ensure!(delivered as usize >= MESSAGES, "the agent delivered {delivered} messages through POP, expected at least {MESSAGES}");
    Ok(())
}

/// One consumer is frozen (SIGSTOP) while it holds messages. The others keep
/// consuming what is produced afterwards, and receive the frozen consumer's
/// messages once their invisible time passes (the agent stops renewing the
/// receipts of a client that has gone silent).
#[test]
fn a_frozen_consumer_does_not_stall_the_group() -> Result<()> {
    use nix::sys::signal::Signal;
    use std::collections::BTreeSet;
    use std::time::Instant;

    const INVISIBLE_MS: u64 = 20_000;
    let lab = Lab::up("frz")?;
    let peers = Peers::start(&lab)?;
    let args = vec!["--convert".into(), "all".into(), "--pop-invisible-ms".into(), INVISIBLE_MS.to_string()];
    let _agent = Agent::start(&lab, AgentOptions { extra_args: args, ..Default::default() })?;
    lab.capture_pod(None)?;
    create_topic(&lab.brk(), peers.broker(), "POP_FREEZE", 2)?;
    let (pod, ns_addr) = (lab.pod(), peers.namesrv());
    let victim = Consumer::start(Sdk::Python, "victim", &pod, ns_addr, "POP_FREEZE", "g_frz", 120, &[], lab.workdir())?;
    let others = [
        Consumer::start(Sdk::Rust, "rs-a", &pod, ns_addr, "POP_FREEZE", "g_frz", 120, &[], lab.workdir())?,
        Consumer::start(Sdk::Python, "py-b", &pod, ns_addr, "POP_FREEZE", "g_frz", 120, &[], lab.workdir())?,
    ];
    std::thread::sleep(Duration::from_secs(12));

    // Freeze the victim while its long-poll PULLs are outstanding, then produce
    // one message at a time: its waiting polls take messages it can never process.
    victim.signal(Signal::SIGSTOP)?;
    let frozen_at = Instant::now();
    let (frz1, failed) = rmq_e2e::group::produce_counting(&pod, ns_addr, "POP_FREEZE", 30, "frz1", 0.1, lab.workdir())?;
    ensure!(failed == 0 && frz1.len() == 30, "producer: {} sent, {failed} failed", frz1.len());
    let victim_done = received([&victim]);
    // A hung consumer holds at most the batches its in-flight polls took; it
    // sends no new PULLs, so what is produced next goes to the others, promptly.
    std::thread::sleep(Duration::from_secs(3));
    let t3 = Instant::now();
    produce(&pod, ns_addr, "POP_FREEZE", 30, "frz2", lab.workdir())?;
    let seen_by_others = || received(&others);
    let third = bodies_of("frz2", 30);
    rmq_e2e::lab::wait_for("the others to consume everything produced once the frozen consumer's polls were spent", Duration::from_secs(15), || {
        Ok(third.is_subset(&seen_by_others()).then_some(()))
    })?;
    let flowing = t3.elapsed();
    // And whatever the frozen consumer was handed but never processed comes back
    // to the others once its invisible time passes (its receipts are not renewed).
    let all: BTreeSet<String> = bodies_of("frz1", 30).union(&third).cloned().collect();
    rmq_e2e::lab::wait_for("every message to be consumed by someone", Duration::from_secs(75), || {
        let consumed: BTreeSet<String> = seen_by_others().union(&victim_done).cloned().collect();
        Ok(all.is_subset(&consumed).then_some(()))
    })?;
    let recovered = frozen_at.elapsed();
    victim.signal(Signal::SIGCONT)?;
    let redelivered: Vec<String> = others
        .iter()
        .flat_map(|c| c.deliveries())
        .filter(|d| d.reconsume > 0 && !victim_done.contains(&d.body))
        .map(|d| d.body)
        .collect();
    println!(
        "POP REPORT freeze: victim_processed={} next_batch_consumed_by_others_in_ms={} \
         all_consumed_after_freeze_ms={} redelivered_from_victim={} invisible_ms={INVISIBLE_MS}",
        victim_done.len(), flowing.as_millis(), recovered.as_millis(), redelivered.len()
    );
    ensure!(!redelivered.is_empty(), "nothing the frozen consumer held came back redelivered; the scenario did not exercise expiry");
    Ok(())
}

/// The agent is SIGKILLed mid-stream (its receipts die with it) and restarted.
/// Every message the broker acknowledged is still consumed, at least once: the
/// SDKs reconnect and re-pull, and what the dead agent held comes back after
/// its invisible time.
#[test]
fn agent_killed_mid_stream_loses_nothing() -> Result<()> {
    use std::time::Instant;

    let lab = Lab::up("kil")?;
    let peers = Peers::start(&lab)?;
    let args = vec!["--convert".into(), "all".into(), "--pop-invisible-ms".into(), "20000".into()];
    let mut agent = Agent::start(&lab, AgentOptions { extra_args: args, ..Default::default() })?;
    lab.capture_pod(None)?;
    create_topic(&lab.brk(), peers.broker(), "POP_KILL", 2)?;
    let (pod, ns_addr) = (lab.pod(), peers.namesrv());
    let consumers = [
        Consumer::start(Sdk::Python, "py-a", &pod, ns_addr, "POP_KILL", "g_kil", 110, &[], lab.workdir())?,
        Consumer::start(Sdk::Rust, "rs-b", &pod, ns_addr, "POP_KILL", "g_kil", 110, &[], lab.workdir())?,
        Consumer::start(Sdk::Python, "py-c", &pod, ns_addr, "POP_KILL", "g_kil", 110, &[], lab.workdir())?,
    ];
    std::thread::sleep(Duration::from_secs(12));
    let (sent, failed, killed_at) = std::thread::scope(|s| -> Result<_> {
        let producer = s.spawn(|| rmq_e2e::group::produce_counting(&pod, ns_addr, "POP_KILL", 80, "kil", 0.1, lab.workdir()));
        std::thread::sleep(Duration::from_secs(4));
        agent.kill()?;
        let killed_at = Instant::now();
        agent.restart()?;
        let (sent, failed) = producer.join().expect("producer thread panicked")?;
        Ok((sent, failed, killed_at))
    })?;
    let consumed = || received(&consumers);
    let waited = rmq_e2e::lab::wait_for("every acknowledged message to be consumed after the agent was killed", Duration::from_secs(80), || {
        Ok(sent.is_subset(&consumed()).then(|| killed_at.elapsed()))
    });
    let deliveries: usize = consumers.iter().map(|c| c.deliveries().len()).sum();
    let got = consumed();
    let missing: Vec<&String> = sent.difference(&got).collect();
    println!(
        "POP REPORT kill: sent_ok={} send_failed={failed} consumed_unique={} deliveries={deliveries} duplicates={} missing={} all_consumed_after_kill_ms={:?}",
        sent.len(), got.len(), deliveries.saturating_sub(got.len()), missing.len(), waited.as_ref().map(|d| d.as_millis()).ok()
    );
    waited?;
    ensure!(sent.len() >= 60, "only {} of 80 sends succeeded; the run says little", sent.len());
    Ok(())
}

/// A consumer answers RECONSUME_LATER for one message. In a converted group the
/// SDK's send-back becomes CHANGE_INVISIBLETIME: the message comes back with
/// reconsumeTimes + 1, and at the reconsume limit the agent moves it to
/// `%DLQ%<group>` (pop revive has no DLQ of its own). Other messages flow on.
#[test]
fn reconsume_later_retries_then_dead_letters() -> Result<()> {
    use rmq_e2e::frames::RemotingConn;
    use std::net::TcpStream;

    let lab = Lab::up("dlq")?;
    let peers = Peers::start(&lab)?;
    let args = ["--convert", "all", "--pop-invisible-ms", "20000", "--pop-max-reconsume", "3", "--pop-retry-delay-ms", "2000"];
    let _agent = Agent::start(&lab, AgentOptions { extra_args: args.iter().map(|s| s.to_string()).collect(), ..Default::default() })?;
    lab.capture_pod(None)?;
    create_topic(&lab.brk(), peers.broker(), "POP_DLQ", 2)?;
    let (pod, ns_addr) = (lab.pod(), peers.namesrv());
    let c = Consumer::start(Sdk::Python, "picky", &pod, ns_addr, "POP_DLQ", "g_dlq", 70, &["--reconsume-later", "dlq i=3"], lab.workdir())?;
    std::thread::sleep(Duration::from_secs(12));
    produce(&pod, ns_addr, "POP_DLQ", 6, "dlq", lab.workdir())?;

    // The poison message is delivered with reconsume 0, 1, 2, then dead-lettered.
    let tries = rmq_e2e::lab::wait_for("the poison message to be retried up to the limit", Duration::from_secs(40), || {
        let r: Vec<u32> = c.deliveries().into_iter().filter(|d| d.body == "dlq i=3").map(|d| d.reconsume).collect();
        Ok((r.len() >= 3).then_some(r))
    })?;
    ensure!(tries[..3] == [0, 1, 2], "reconsume counts of the poison message: {tries:?}");

    let dlq: Vec<String> = rmq_e2e::lab::wait_for("the poison message in %DLQ%g_dlq", Duration::from_secs(20), || {
        let msgs = lab.pod().run(move || -> Result<_> {
            let mut conn = RemotingConn::new(TcpStream::connect_timeout(&peers_broker(), Duration::from_secs(2))?)?;
            conn.pull_all("%DLQ%g_dlq", "dlq_reader", 1)
        });
        let bodies: Vec<String> = msgs.ok().unwrap_or_default().into_iter().map(|m| String::from_utf8_lossy(&m.body).into_owned()).collect();
        Ok(bodies.iter().any(|b| b == "dlq i=3").then_some(bodies))
    })?;
    std::thread::sleep(Duration::from_secs(8));
    let consumed: Vec<String> = c.deliveries().into_iter().map(|d| d.body).collect();
    let poison = consumed.iter().filter(|b| *b == "dlq i=3").count();
    println!("POP REPORT dlq: poison_deliveries={poison} reconsume_counts={tries:?} dlq={dlq:?} consumed={consumed:?}");
    ensure!(poison == 3, "after dead-lettering, the poison message must not come back (delivered {poison} times)");
    // The cpp SDK sends its whole consume batch back when one message fails, so a
    // neighbour may share the poison message's fate: consumed or dead-lettered, never lost.
    for i in 0..6 {
        let b = format!("dlq i={i}");
        ensure!(consumed.contains(&b) || dlq.contains(&b), "{b} was neither consumed nor dead-lettered");
    }
    Ok(())
}

fn peers_broker() -> std::net::SocketAddr {
    std::net::SocketAddr::new(rmq_e2e::lab::BROKER_V4.into(), rmq_e2e::peers::BROKER_PORT)
}

/// A pod is deleted mid-flight the hard way: its network vanishes first (no FIN or RST
/// ever reaches the agent), then its consumer is killed and the runtime runs CNI DEL.
/// Nothing it held is lost: the other consumers receive it once its receipts lapse
/// (the agent stops renewing for a silent client), and the agent drops the dead
/// connections on its own (TCP keepalive), releasing whatever they still held.
#[test]
fn a_pod_deleted_mid_flight_loses_nothing() -> Result<()> {
    use nix::sys::signal::Signal;
    use std::collections::BTreeSet;
    use std::time::Instant;

    let lab = Lab::up("pdel")?;
    let peers = Peers::start(&lab)?;
    let args = vec!["--convert".into(), "all".into(), "--pop-invisible-ms".into(), "20000".into()];
    let _agent = Agent::start(&lab, AgentOptions { extra_args: args, ..Default::default() })?;
    lab.capture_pod(None)?;
    lab.capture_pod2()?;
    create_topic(&lab.brk(), peers.broker(), "POP_PDEL", 2)?;
    let ns_addr = peers.namesrv();
    let victim = Consumer::start(Sdk::Python, "victim", &lab.pod2(), ns_addr, "POP_PDEL", "g_pdel", 150, &[], lab.workdir())?;
    let others = [
        Consumer::start(Sdk::Rust, "rs-a", &lab.pod(), ns_addr, "POP_PDEL", "g_pdel", 150, &[], lab.workdir())?,
        Consumer::start(Sdk::Python, "py-b", &lab.pod(), ns_addr, "POP_PDEL", "g_pdel", 150, &[], lab.workdir())?,
    ];
    std::thread::sleep(Duration::from_secs(12));
    let (first, failed) = rmq_e2e::group::produce_counting(&lab.pod(), ns_addr, "POP_PDEL", 30, "pd1", 0.1, lab.workdir())?;
    ensure!(failed == 0 && first.len() == 30, "producer: {} sent, {failed} failed", first.len());
    let victim_conns = || -> Result<usize> { Ok(lab.established(&lab.node(), 10911)?.iter().filter(|(_, peer)| peer.contains("10.200.3.2]:") || peer.starts_with("10.200.3.2:")).count()) };
    ensure!(victim_conns()? > 0, "the victim in pod2 has no connection through the agent: {:?}\nvictim output:\n{}", lab.established(&lab.node(), 10911)?, victim.output());

    // The pod goes away: network first, then its process, then CNI DEL.
    lab.node().sh("ip link del pod1")?;
    let gone_at = Instant::now();
    victim.signal(Signal::SIGKILL)?;
    lab.release_pod2()?;
    let victim_done = received([&victim]);
    produce(&lab.pod(), ns_addr, "POP_PDEL", 30, "pd2", lab.workdir())?;

    let seen_by_others = || received(&others);
    let all: BTreeSet<String> = bodies_of("pd1", 30).union(&bodies_of("pd2", 30)).cloned().collect();
    rmq_e2e::lab::wait_for("every message to be consumed by a surviving consumer or by the victim before it went", Duration::from_secs(90), || {
        let consumed: BTreeSet<String> = seen_by_others().union(&victim_done).cloned().collect();
        Ok(all.is_subset(&consumed).then_some(()))
    })?;
    let recovered = gone_at.elapsed();
    let came_back: usize = others.iter().flat_map(|c| c.deliveries()).filter(|d| d.reconsume > 0 && !victim_done.contains(&d.body)).count();

    rmq_e2e::lab::wait_for("the agent to drop the deleted pod's connections", Duration::from_secs(100), || Ok((victim_conns()? == 0).then_some(())))?;
    let dropped = gone_at.elapsed();
    let dups = GroupReport::new(&others, "pd").duplicates();
    println!(
        "POP REPORT pod-deleted: victim_processed={} all_consumed_after_ms={} came_back_redelivered={came_back} \
         dead_connections_dropped_after_ms={} duplicates_among_survivors={dups}",
        victim_done.len(), recovered.as_millis(), dropped.as_millis()
    );
    Ok(())
}

/// Converted connections move to the new agent with their receipts and sessions: the
/// SDKs keep their connections, commit through the new agent what they got from the
/// old one, and nothing is released or redelivered. Every message sent across two
/// upgrades is consumed exactly once.
#[test]
fn converted_consumers_lose_nothing_across_upgrades() -> Result<()> {
    let lab = Lab::up("pupg")?;
    let peers = Peers::start(&lab)?;
    let args = ["--convert", "all", "--pop-invisible-ms", "20000", "--drain-timeout-ms", "3000"];
    let mut agent = Agent::start(&lab, AgentOptions { extra_args: args.iter().map(|s| s.to_string()).collect(), ..Default::default() })?;
    lab.capture_pod(None)?;
    create_topic(&lab.brk(), peers.broker(), "POP_UPG", 2)?;
    let (pod, ns_addr) = (lab.pod(), peers.namesrv());
    let consumers = [
        // Slow, so that it holds uncommitted messages when the agents change.
        Consumer::start(Sdk::Python, "py-a", &pod, ns_addr, "POP_UPG", "g_upg", 110, &["--process-ms", "300"], lab.workdir())?,
        Consumer::start(Sdk::Rust, "rs-b", &pod, ns_addr, "POP_UPG", "g_upg", 110, &[], lab.workdir())?,
    ];
    std::thread::sleep(Duration::from_secs(12));
    let mut last_upgrade = std::time::Instant::now();
    let (sent, failed) = std::thread::scope(|s| -> Result<_> {
        let producer = s.spawn(|| rmq_e2e::group::produce_counting(&pod, ns_addr, "POP_UPG", 80, "upg", 0.1, lab.workdir()));
        for _ in 0..2 {
            std::thread::sleep(Duration::from_secs(3));
            agent.upgrade_no_wait()?;
            last_upgrade = std::time::Instant::now();
        }
        Ok(producer.join().expect("producer thread panicked")?)
    })?;
    let consumed = || received(&consumers);
    let waited = rmq_e2e::lab::wait_for("every acknowledged message to be consumed across the upgrades", Duration::from_secs(80), || {
        Ok(sent.is_subset(&consumed()).then_some(()))
    });
    // Each old agent exits on its own once the POPs it started came back (a long poll
    // lasts up to 20 s) and it has released what they brought.
    agent.wait_predecessors(Duration::from_secs(40))?;
    // A receipt that did not move, or that the new agent failed to ACK, is redelivered once
    // the invisible time (20 s) is over: count duplicates only after that.
    std::thread::sleep(Duration::from_secs(25).saturating_sub(last_upgrade.elapsed()));
    let log = agent.log()?;
    let sum = |message: &str| -> u64 {
        log.lines.iter().filter(|l| l.message() == message).filter_map(|l| l.field("receipts")?.parse::<u64>().ok()).sum()
    };
    let count = |message: &str| log.lines.iter().filter(|l| l.message() == message).count();
    let released = sum("released the receipts of connections still open at exit");
    let handed = sum("handing this connection's Pull→Pop state to the new agent");
    let adopted = sum("adopted the previous agent's Pull→Pop state for this connection");
    let moved_conns = count("adopted the previous agent's Pull→Pop state for this connection");
    let report = GroupReport::new(&consumers, "upg");
    println!(
        "POP REPORT upgrade: sent_ok={} send_failed={failed} consumed_unique={} duplicates={} receipts_handed_over={handed} \
         receipts_adopted={adopted} converted_connections_moved={moved_conns} released_at_handover={released}",
        sent.len(), report.unique.len(), report.duplicates()
    );
    waited?;
    ensure!(sent.len() >= 60, "only {} of 80 sends succeeded; the run says little", sent.len());
    ensure!(moved_conns >= 2, "converted connections did not move to the new agents ({moved_conns} adopted)");
    ensure!(handed > 0, "no receipt was held at either hand-over; the run says nothing about moving them");
    ensure!(handed == adopted, "{handed} receipts handed over but {adopted} adopted");
    ensure!(released == 0, "{released} receipts were released at exit instead of moving");
    ensure!(report.duplicates() == 0, "{} messages were delivered twice across the upgrades", report.duplicates());
    Ok(())
}

/// Under a DaemonSet the old pod is deleted once the new one is ready, which may be while
/// the old agent still waits for the POPs it started. With `--idle-after-handover` that
/// SIGTERM must end it once it is done, not leave it idling until the kubelet's SIGKILL.
#[test]
fn a_predecessor_stopped_while_settling_exits_instead_of_idling() -> Result<()> {
    use nix::sys::signal::Signal;

    let lab = Lab::up("psettle")?;
    let peers = Peers::start(&lab)?;
    let args = ["--convert", "all", "--idle-after-handover"];
    let mut agent = Agent::start(&lab, AgentOptions { extra_args: args.iter().map(|s| s.to_string()).collect(), ..Default::default() })?;
    lab.capture_pod(None)?;
    create_topic(&lab.brk(), peers.broker(), "POP_SETTLE", 2)?;
    let consumer = Consumer::start(Sdk::Python, "py-s", &lab.pod(), peers.namesrv(), "POP_SETTLE", "g_settle", 60, &[], lab.workdir())?;
    // Its long-poll PULLs are POPs waiting at the broker when the hand-over answers them.
    agent.wait_log("a converted PULL to be served by POP", Duration::from_secs(30), |l| l.is("converting this consumer group from PULL to POP"))?;
    std::thread::sleep(Duration::from_secs(3));
    agent.upgrade_no_wait()?;
    let answered: u64 = agent
        .log()?
        .lines
        .iter()
        .filter(|l| l.is("handing this connection's Pull→Pop state to the new agent"))
        .filter_map(|l| l.field("pulls_answered")?.parse::<u64>().ok())
        .sum();
    agent.signal_predecessors(Signal::SIGTERM)?;
    let t = std::time::Instant::now();
    agent.wait_predecessors(Duration::from_secs(30))?;
    let idled = agent.log()?.lines.iter().any(|l| l.is("handed over to a newer agent; idle until SIGTERM"));
    println!("POP REPORT settle: pulls_answered_at_handover={answered} predecessor_exited_after_ms={} idled={idled}", t.elapsed().as_millis());
    ensure!(answered > 0, "no PULL was waiting on a POP at the hand-over; the run says nothing");
    ensure!(!idled, "the predecessor went idle although it had been told to stop");
    drop(consumer);
    Ok(())
}

