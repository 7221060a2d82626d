//! With the capture rules installed but no agent, captured traffic is blocked (TPROXY
//! drops SYNs that find no transparent listener, so the client times out) and never
//! leaks to the broker; an uncaptured port still works. Once the agent starts, the same
//! connection goes through.
rmq_e2e::sandboxed_test_binary!();

use std::io::ErrorKind;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use rmq_e2e::agent::{Agent, AgentOptions};
use rmq_e2e::frames::RemotingConn;
use rmq_e2e::lab::{Lab, POD_V4};
use rmq_e2e::netns::Netns;
use rmq_e2e::peers::{Peers, BROKER_HA_PORT};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

#[test]
fn captured_traffic_is_blocked_while_agent_is_down() -> Result<()> {
    let lab = Lab::up("down")?;
    let peers = Peers::start(&lab)?;
    lab.capture_pod(None)?;
    let syn_counter = SynCounter::install(&lab.brk(), peers.namesrv().port())?;
    let namesrv = peers.namesrv();

    // Captured port, no agent: the SYN is swallowed on the node, no SYN-ACK, no RST.
    let t0 = Instant::now();
    let r = lab.pod().run(|| TcpStream::connect_timeout(&namesrv, CONNECT_TIMEOUT));
    match r {
        Err(e) if e.kind() == ErrorKind::TimedOut => {}
        Err(e) => bail!("connect to {namesrv} with the agent down failed with {e} ({:?}), want a timeout", e.kind()),
        Ok(s) => bail!("connect to {namesrv} succeeded with the agent down (local {:?}): capture leaks", s.local_addr()),
    }
    ensure!(t0.elapsed() >= CONNECT_TIMEOUT - Duration::from_millis(100), "gave up after {:?}", t0.elapsed());

    // An uncaptured port (the broker's HA listener) is routed normally.
    let ha = SocketAddr::new(namesrv.ip(), BROKER_HA_PORT);
    let direct = lab.pod().run(|| TcpStream::connect_timeout(&ha, CONNECT_TIMEOUT));
    ensure!(direct.is_ok(), "uncaptured {ha} must work while the agent is down: {direct:?}");
    drop(direct);

    // The broker never saw the captured attempt: no SYN reached its netns on :9876.
    ensure!(syn_counter.read()? == 0, "the broker received {} SYNs on :9876 with the agent down", syn_counter.read()?);
    let pod_conns: Vec<_> = lab
        .established(&lab.brk(), namesrv.port())?
        .into_iter()
        .filter(|(_, peer)| !peer.starts_with(&format!("{}:", namesrv.ip())))
        .collect();
    ensure!(pod_conns.is_empty(), "the name server has connections from outside its netns: {pod_conns:?}");

    // Start the agent: the same connection now goes through and works.
    let agent = Agent::start(&lab, AgentOptions::default())?;
    let stream = lab
        .pod()
        .run(|| TcpStream::connect_timeout(&namesrv, CONNECT_TIMEOUT))
        .with_context(|| format!("connect to {namesrv} with the agent up"))?;
    let mut conn = RemotingConn::new(stream)?;
    let resp = conn.route("TBW102")?;
    ensure!(resp.code() == 0, "GET_ROUTEINFO_BY_TOPIC via the agent answered {:?}", resp.header);
    ensure!(syn_counter.read()? >= 1, "no SYN reached the broker netns once the agent was up");
    agent.log()?.ensure_requests("GET_ROUTEINFO_BY_TOPIC", POD_V4.into(), namesrv, 1)?;
    Ok(())
}

/// Counts TCP SYNs that arrive on the broker netns' eth0 for one port (an iptables
/// counting rule inside the lab's broker namespace).
struct SynCounter {
    ns: Netns,
    port: u16,
}

impl SynCounter {
    fn install(ns: &Netns, port: u16) -> Result<SynCounter> {
        ns.sh(&format!("iptables -w 5 -I INPUT 1 -i eth0 -p tcp --syn --dport {port} -m comment --comment rmq-e2e-syn"))?;
        Ok(SynCounter { ns: ns.clone(), port })
    }

    fn read(&self) -> Result<u64> {
        let out = self.ns.sh("iptables -w 5 -L INPUT -v -x -n")?;
        let line = out
            .lines()
            .find(|l| l.contains("rmq-e2e-syn") && l.contains(&format!("dpt:{}", self.port)))
            .context("the SYN counting rule is gone")?;
        line.split_whitespace().next().context("no packet count")?.parse().context("packet count")
    }
}
