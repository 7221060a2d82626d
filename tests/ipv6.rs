//! IPv6: the pod reaches the name server and broker over IPv6 through the agent.
//!
//! The rocketmq-rust name server and broker bind and advertise IPv6 fine
//! (BIND_IP=fd00:200:2::2; routes then carry "[fd00:200:2::2]:10911"). The Python SDK
//! (rocketmq-client-cpp 1.x) cannot: it splits "host:port" at the first ':' and fails
//! with "Failed to resolve host name([fd00)", so IPv6 is driven by the raw client
//! (route lookup, SEND_MESSAGE, PULL_MESSAGE, byte-exact compare) and by the Rust SDK,
//! which handles "[fd00:200:2::2]:9876".
rmq_e2e::sandboxed_test_binary!();

use std::net::{IpAddr, SocketAddr, TcpStream};

use anyhow::{ensure, Context, Result};
use rmq_e2e::agent::{Agent, AgentOptions};
use rmq_e2e::frames::RemotingConn;
use rmq_e2e::lab::{Lab, BROKER_V6, POD_V6};
use rmq_e2e::peers::Peers;
use rmq_e2e::sdk::{self, Sdk, SdkOptions};
use serde_json::Value;

#[test]
fn pod_reaches_ipv6_name_server_and_broker_through_agent() -> Result<()> {
    let lab = Lab::up("v6")?;
    let peers = Peers::start_on(&lab, IpAddr::V6(BROKER_V6))?;
    let agent = Agent::start(&lab, AgentOptions::default())?;
    lab.capture_pod(None)?;
    let (namesrv, broker) = (peers.namesrv(), peers.broker());
    let pod = IpAddr::V6(POD_V6);
    let topic = "E2E_V6";

    // Route lookup over IPv6; the route must advertise the IPv6 broker.
    let mut ns = RemotingConn::new(lab.pod().run(|| TcpStream::connect(namesrv)).context("connect to the v6 name server")?)?;
    ensure!(ns.stream().local_addr()?.ip() == pod, "the pod did not use its IPv6 address");
    let r = ns.route("TBW102")?;
    ensure!(r.code() == 0, "GET_ROUTEINFO_BY_TOPIC over v6 answered {:?}", r.header);
    let route: Value = serde_json::from_slice(&r.body)?;
    let advertised = route["brokerDatas"][0]["brokerAddrs"]["0"].as_str().unwrap_or_default().to_string();
    ensure!(advertised.parse::<SocketAddr>().ok() == Some(broker), "route advertises {advertised:?}, want {broker}");

    // Produce and consume over IPv6, comparing bodies and keys exactly.
    let mut br = RemotingConn::new(lab.pod().run(|| TcpStream::connect(broker)).context("connect to the v6 broker")?)?;
    let sent: Vec<(Vec<u8>, String)> =
        (0..10).map(|i| (format!("v6 message {i} äö€ {}", "x".repeat(i * 300)).into_bytes(), format!("k{i}"))).collect();
    for (i, (body, key)) in sent.iter().enumerate() {
        br.send_message(topic, (i % 4) as u32, key, body)?;
    }
    let queues = ns.read_queue_nums(topic)?;
    let mut got: Vec<(Vec<u8>, String)> = br
        .pull_all(topic, "rmq_e2e_v6", queues)?
        .into_iter()
        .map(|m| (m.body.clone(), m.keys().unwrap_or_default().to_string()))
        .collect();
    got.sort();
    let mut want = sent.clone();
    want.sort();
    ensure!(got == want, "messages pulled over v6 differ from those sent: got {} want {}", got.len(), want.len());

    let log = agent.log()?;
    log.ensure_requests("GET_ROUTEINFO_BY_TOPIC", pod, namesrv, 2)?;
    log.ensure_requests("SEND_MESSAGE", pod, broker, sent.len())?;
    log.ensure_requests("PULL_MESSAGE", pod, broker, 1)?;

    // A real SDK over IPv6: the Rust SDK produces and consumes through the agent.
    let before = agent.log()?.lines.len();
    let run = sdk::run(Sdk::Rust, &lab.pod(), namesrv, &SdkOptions::push("E2E_V6_RS", 20), lab.workdir())?;
    run.ensure_passed()?;
    sdk::ensure_rust_messages_stored_exactly(&lab.pod(), namesrv, broker, "E2E_V6_RS", &run)?;
    let log = agent.log()?.after(before);
    log.ensure_requests("GET_ROUTEINFO_BY_TOPIC", pod, namesrv, 1)?;
    log.ensure_requests("SEND_MESSAGE", pod, broker, 21)?;
    log.ensure_requests("PULL_MESSAGE", pod, broker, 1)?;
    log.ensure_requests("HEART_BEAT", pod, broker, 1)?;
    Ok(())
}
