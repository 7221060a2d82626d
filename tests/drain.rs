//! SIGTERM without a successor: the agent stops accepting, and drains. Clients
//! that understand GO_AWAY (protocol version > 5.3.1) get it as the answer to
//! their next request, so they reconnect and retry; older clients keep being
//! relayed until they close or the drain deadline passes.
rmq_e2e::sandboxed_test_binary!();

use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use rmq_e2e::agent::{Agent, AgentOptions};
use rmq_e2e::frames::RemotingConn;
use rmq_e2e::lab::Lab;
use rmq_e2e::peers::Peers;

/// RocketMQ 5.3.3's version ordinal: understands GO_AWAY.
const NEW_CLIENT: i32 = 479;
/// RocketMQ 4.9.4's: does not.
const OLD_CLIENT: i32 = 401;
const GO_AWAY: i64 = 1500;

#[test]
fn sigterm_sends_go_away_only_to_clients_that_understand_it() -> Result<()> {
    let lab = Lab::up("drn")?;
    let peers = Peers::start(&lab)?;
    let mut agent = Agent::start(&lab, AgentOptions { extra_args: vec!["--drain-timeout-ms".into(), "20000".into()], ..Default::default() })?;
    lab.capture_pod(None)?;
    let namesrv = peers.namesrv();
    let connect = |version| -> Result<RemotingConn> {
        Ok(RemotingConn::new(TcpStream::connect_timeout(&namesrv, Duration::from_secs(2))?)?.with_version(version))
    };
    let (mut new, mut old) = lab.pod().run(|| -> Result<_> { Ok((connect(NEW_CLIENT)?, connect(OLD_CLIENT)?)) })?;
    ensure!(new.route("TBW102")?.code() == 0, "route before drain (new client)");
    ensure!(old.route("TBW102")?.code() == 0, "route before drain (old client)");

    agent.terminate()?;
    std::thread::sleep(Duration::from_millis(300));
    let r = new.route("TBW102")?;
    ensure!(r.code() == GO_AWAY, "a 5.3.3 client should get GO_AWAY while draining, got code {}", r.code());
    let r = old.route("TBW102")?;
    ensure!(r.code() == 0, "a 4.9.4 client must still be relayed while draining, got code {}", r.code());
    // Stopped accepting: a new connection finds no listener (TPROXY drops the SYN).
    let fresh = lab.pod().run(move || TcpStream::connect_timeout(&namesrv, Duration::from_secs(2)));
    ensure!(fresh.is_err(), "a draining agent must not accept new connections");

    // Once the clients close, the drain ends long before its 20 s deadline.
    let t0 = Instant::now();
    drop((new, old));
    ensure!(agent.wait_exit(Duration::from_secs(10))?, "the agent did not exit after its last connection closed");
    println!("DRAIN REPORT exit_after_last_close_ms={}", t0.elapsed().as_millis());
    let log = agent.log()?;
    ensure!(log.lines.iter().any(|l| l.message().starts_with("draining")), "no drain log line");
    Ok(())
}
