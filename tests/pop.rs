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
use rmq_e2e::group::{create_topic, produce, Consumer, GroupReport};
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
    lab.capture_pod(agent.binary(), None)?;
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
