//! IPv4 data path: real SDKs in the pod produce and consume through the agent.
//!
//! The SDKs are pointed at the real name server (10.200.2.2:9876); the node's TPROXY
//! capture is what sends them through the agent, for the name server and for the broker
//! address the routes advertise (10.200.2.2:10911).
rmq_e2e::sandboxed_test_binary!();

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr, TcpStream};

use anyhow::{ensure, Context, Result};
use rmq_e2e::agent::{Agent, AgentOptions};
use rmq_e2e::frames::RemotingConn;
use rmq_e2e::lab::{Lab, NODE_BRK_SIDE_V4, POD_V4};
use rmq_e2e::peers::{Peers, BROKER_PORT, NAMESRV_PORT};
use rmq_e2e::sdk::{self, Sdk, SdkOptions};
use rmq_e2e::telemetry::MSG_MALFORMED;

const MESSAGES: usize = 20;

#[test]
fn sdks_produce_and_consume_through_agent() -> Result<()> {
    sdks_through_agent("dp", false)
}

#[test]
fn sdks_produce_and_consume_through_agent_spoofing_pod_source() -> Result<()> {
    sdks_through_agent("dps", true)
}

fn sdks_through_agent(prefix: &str, spoof_source: bool) -> Result<()> {
    let lab = Lab::up(prefix)?;
    let peers = Peers::start(&lab)?;
    let agent = Agent::start(&lab, AgentOptions { spoof_source, ..Default::default() })?;
    lab.capture_pod(None)?;
    let pod = IpAddr::V4(POD_V4);
    let (namesrv, broker) = (peers.namesrv(), peers.broker());

    for (sdk, topic) in [(Sdk::Python, "E2E_PY"), (Sdk::Rust, "E2E_RS")] {
        let before = agent.log()?.lines.len();
        let run = sdk::run(sdk, &lab.pod(), namesrv, &SdkOptions::push(topic, MESSAGES), lab.workdir())?;
        run.ensure_passed()?;
        println!("{sdk:?} SDK: {:.1}s, {}", run.elapsed.as_secs_f64(), run.stdout.lines().filter(|l| l.starts_with("mode=") || l.starts_with("verify")).collect::<Vec<_>>().join("; "));
        if sdk == Sdk::Rust {
            sdk::ensure_rust_messages_stored_exactly(&lab.pod(), namesrv, broker, topic, &run)?;
        }

        // The agent relayed all of it: the access log saw the SDK's requests, with the
        // pod as the source and the real servers as the original destinations.
        let log = agent.log()?.after(before);
        log.ensure_requests("GET_ROUTEINFO_BY_TOPIC", pod, namesrv, 1)?;
        // Both SDKs send SEND_MESSAGE (10), never SEND_MESSAGE_V2 (310): N + a warm-up.
        let sends = log.ensure_requests("SEND_MESSAGE", pod, broker, MESSAGES + 1)?;
        ensure!(log.requests("SEND_MESSAGE_V2").count() == 0, "unexpected SEND_MESSAGE_V2 from {sdk:?}");
        let ok_sends = log
            .requests("SEND_MESSAGE")
            .filter(|l| l.field("response_code").as_deref() == Some("0"))
            .count();
        ensure!(ok_sends > MESSAGES, "{ok_sends} of {sends} SEND_MESSAGE lines carry response_code 0");
        log.ensure_requests("PULL_MESSAGE", pod, broker, 1)?;
        log.ensure_requests("HEART_BEAT", pod, broker, 1)?;
        ensure!(log.with_message(MSG_MALFORMED).count() == 0, "codec errors on SDK traffic:\n{}", log.tail(20));
    }

    // The route cache in the state dump: what the name server told the pod.
    let state = agent.state()?;
    let route = state["routes"].as_array().into_iter().flatten().find(|r| r["topic"] == "E2E_PY").with_context(|| format!("no route for E2E_PY in the dump: {}", state["routes"]))?;
    ensure!(
        route["brokers"].as_array().into_iter().flatten().any(|b| b["addr"] == broker.to_string() && b["readable"] == true),
        "route cache for E2E_PY: {route}"
    );

    let m = agent.metrics()?;
    ensure!(m.get("rmq_agent_connections_total", &[("result", "proxied")]) >= 4.0, "proxied connections:\n{}", m.text);
    ensure!(
        m.get("rmq_agent_requests_total", &[("code", "SEND_MESSAGE"), ("dir", "client")]) >= (2 * (MESSAGES + 1)) as f64,
        "requests_total SEND_MESSAGE:\n{}",
        m.text
    );
    ensure!(m.named("rmq_agent_frame_errors_total").all(|s| s.value == 0.0), "frame errors:\n{}", m.text);

    // Who does the broker see? Hold one relayed connection to each server open and ask
    // the broker netns: the node's address (10.200.2.1) normally, the pod's with
    // --spoof-source; never both.
    let want_src = if spoof_source { pod } else { IpAddr::V4(NODE_BRK_SIDE_V4) };
    let mut held = Vec::new();
    for dst in [namesrv, broker] {
        let mut c = RemotingConn::new(lab.pod().run(|| TcpStream::connect(dst)).with_context(|| format!("connect to {dst}"))?)?;
        let r = c.route("E2E_PY")?;
        ensure!(dst.port() != NAMESRV_PORT || r.code() == 0, "route via the agent answered {:?}", r.header);
        held.push(c);
    }
    for port in [NAMESRV_PORT, BROKER_PORT] {
        let peers_seen: BTreeSet<IpAddr> = lab
            .established(&lab.brk(), port)?
            .iter()
            .filter_map(|(_, peer)| peer.parse::<SocketAddr>().ok().map(|a| a.ip()))
            .filter(|ip| *ip != IpAddr::V4(rmq_e2e::lab::BROKER_V4)) // the broker's own registration
            .collect();
        ensure!(
            peers_seen.iter().copied().collect::<Vec<_>>() == vec![want_src],
            "port {port}: the broker sees connections from {peers_seen:?}, want only {want_src} (spoof_source={spoof_source})"
        );
    }
    drop(held);
    Ok(())
}
