//! Hitless upgrade: under continuous produce and consume load from the real
//! Python SDK (and a stream of fresh connections), a new agent takes over from
//! the running one five times in a row. Each hand-over passes the listening
//! socket and every live connection to the successor.
//!
//! Asserts zero failed sends, zero failed connects and zero lost messages, and
//! reports duplicates.
rmq_e2e::sandboxed_test_binary!();

use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use rmq_e2e::agent::{Agent, AgentOptions};
use rmq_e2e::frames::RemotingConn;
use rmq_e2e::lab::Lab;
use rmq_e2e::peers::Peers;
use rmq_e2e::sdk::{self, Sdk, SdkOptions};

const UPGRADES: usize = 5;

#[test]
fn five_upgrades_under_load_lose_nothing() -> Result<()> {
    let lab = Lab::up("upg")?;
    let peers = Peers::start(&lab)?;
    let mut agent = Agent::start(&lab, AgentOptions::default())?;
    lab.capture_pod(None)?;
    let (pod, namesrv) = (lab.pod(), peers.namesrv());
    let opts = SdkOptions { send_interval_s: Some(0.1), timeout_s: 90, ..SdkOptions::push("E2E_UPGRADE", 150) };
    let stop = AtomicBool::new(false);

    let (run, probes, upgraded) = std::thread::scope(|s| {
        let load = s.spawn(|| sdk::run(Sdk::Python, &pod, namesrv, &opts, lab.workdir()));
        // A fresh connection and a route lookup every 50 ms: any moment without
        // a listener, or a connection lost in a hand-over, shows up here.
        let prober = s.spawn(|| {
            pod.run(|| {
                let (mut ok, mut failed, mut errors) = (0usize, 0usize, Vec::new());
                while !stop.load(Ordering::Relaxed) {
                    let r = TcpStream::connect_timeout(&namesrv, Duration::from_secs(2))
                        .context("connect")
                        .and_then(|c| {
                            c.set_read_timeout(Some(Duration::from_secs(3)))?;
                            RemotingConn::new(c)?.route("TBW102")
                        });
                    match r {
                        Ok(_) => ok += 1,
                        Err(e) => {
                            failed += 1;
                            errors.push(format!("{e:#}"));
                        }
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                (ok, failed, errors)
            })
        });
        let mut upgraded = Vec::new();
        std::thread::sleep(Duration::from_secs(4));
        for _ in 0..UPGRADES {
            let t0 = Instant::now();
            let r = agent.upgrade();
            upgraded.push(r.map(|()| t0.elapsed()));
            std::thread::sleep(Duration::from_secs(2));
        }
        let run = load.join().expect("SDK thread panicked");
        stop.store(true, Ordering::Relaxed);
        let probes = prober.join().expect("prober thread panicked");
        (run, probes, upgraded)
    });

    let mut took = Vec::new();
    for (i, u) in upgraded.into_iter().enumerate() {
        took.push(u.with_context(|| format!("upgrade {} failed", i + 1))?);
    }
    let run = run?;
    let (ok, failed, errors) = probes;
    let send_failed = run.value("send_failed").context("driver printed no send_failed=")?;
    let duplicates = run.value("duplicates").context("driver printed no duplicates=")?;
    let lost = run.messages.saturating_sub(run.exact().unwrap_or(0));
    println!(
        "UPGRADE REPORT upgrades={UPGRADES} hand_over_ms={:?} sends={} send_failed={send_failed} lost={lost} duplicates={duplicates} \
         connects_ok={ok} connects_failed={failed}",
        took.iter().map(|d| d.as_millis()).collect::<Vec<_>>(),
        run.sent().unwrap_or(0),
    );
    ensure!(failed == 0, "{failed} of {} fresh connections failed during upgrades: {errors:?}", ok + failed);
    ensure!(ok > 100, "the prober made only {ok} connections; the run was too short to mean anything");
    ensure!(send_failed == 0, "{send_failed} sends failed during upgrades:\n{}", run.stderr);
    run.ensure_passed()?;

    let log = agent.log()?;
    let inherited = log.lines.iter().filter(|l| l.message() == "inherited live connections from the previous agent").count();
    ensure!(inherited == UPGRADES, "expected {UPGRADES} inherited hand-overs in the log, saw {inherited}");
    let moved: u64 = log
        .lines
        .iter()
        .filter(|l| l.message() == "inherited live connections from the previous agent")
        .filter_map(|l| l.field("connections")?.parse::<u64>().ok())
        .sum();
    ensure!(moved > 0, "no live connection was ever handed over; the test did not exercise migration");
    println!("UPGRADE REPORT live_connections_handed_over={moved}");

    let status = std::process::Command::new(agent.binary())
        .args(["status", "-o", "json", "--socket"])
        .arg(agent.admin_socket())
        .output()?;
    let dump: serde_json::Value = serde_json::from_slice(&status.stdout).context("status -o json")?;
    ensure!(dump["generation"] == UPGRADES as u64, "generation after {UPGRADES} upgrades: {}", dump["generation"]);
    ensure!(dump["listeners"][0]["inherited"] == true, "the listener should be inherited: {dump}");
    Ok(())
}

/// Under a DaemonSet an exited container is restarted, and a restarted agent would take
/// the listener back from its successor. With `--idle-after-handover` the predecessor
/// stays up holding nothing (no capture or admin listener, no connection) until SIGTERM.
#[test]
fn predecessor_idles_after_handover_until_sigterm() -> Result<()> {
    let lab = Lab::up("upgidle")?;
    let peers = Peers::start(&lab)?;
    let mut agent = Agent::start(&lab, AgentOptions { extra_args: vec!["--idle-after-handover".into()], ..Default::default() })?;
    lab.capture_pod(None)?;
    let namesrv = peers.namesrv();
    let mut conn = lab.pod().run(|| -> Result<RemotingConn> {
        let c = TcpStream::connect_timeout(&namesrv, Duration::from_secs(2))?;
        c.set_read_timeout(Some(Duration::from_secs(3)))?;
        RemotingConn::new(c)
    })?;
    conn.route("TBW102")?;
    let local = conn.local_addr()?.to_string();
    let view = |agent: &Agent| -> Result<serde_json::Value> {
        let state = agent.state()?;
        let conns = state["connections"].as_array().cloned().unwrap_or_default();
        conns.into_iter().find(|c| c["pod"].as_str() == Some(local.as_str())).with_context(|| format!("{local} is not in the state dump: {state}"))
    };
    let before = view(&agent)?;

    let mut old = agent.upgrade_keep_predecessor()?;
    // status goes on showing the connection as it was: same age, its counts carried over.
    let after = view(&agent)?;
    ensure!(after["opened_unix_ms"] == before["opened_unix_ms"], "the connection's age restarted: {before} -> {after}");
    ensure!(
        after["bytes_up"].as_u64() >= before["bytes_up"].as_u64() && after["requests"]["GET_ROUTEINFO_BY_TOPIC"].as_u64() >= Some(1),
        "the connection's counts were lost in the hand-over: {before} -> {after}"
    );
    std::thread::sleep(Duration::from_secs(1));
    ensure!(old.try_wait()?.is_none(), "the predecessor exited after the hand-over; a kubelet would restart it");
    let listeners = lab.node().sh("ss -Hltnp '( sport = :15001 or sport = :15020 )'")?;
    let old_pid = format!("pid={},", old.id());
    ensure!(!listeners.contains(&old_pid), "the idle predecessor still listens:\n{listeners}");
    ensure!(listeners.contains(&format!("pid={},", agent.pid().context("no successor")?)), "the successor does not listen:\n{listeners}");
    let established = lab.node().sh("ss -Htnp state established")?;
    ensure!(!established.contains(&old_pid), "the idle predecessor still holds connections:\n{established}");
    // The live connection moved to the successor and still works.
    conn.route("TBW102").context("the migrated connection")?;

    nix::sys::signal::kill(nix::unistd::Pid::from_raw(old.id() as i32), nix::sys::signal::Signal::SIGTERM)?;
    let t = Instant::now();
    let status = loop {
        if let Some(s) = old.try_wait()? {
            break s;
        }
        ensure!(t.elapsed() < Duration::from_secs(3), "the idle predecessor ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    ensure!(status.success(), "the idle predecessor exited with {status}");
    println!("predecessor idled, then exited {status} {:?} after SIGTERM", t.elapsed());
    agent.wait_log("the predecessor's stop line", Duration::from_secs(2), |l| l.is("rmq-agent stopped (it had handed over)"))?;
    conn.route("TBW102").context("the connection after the predecessor exited")?;
    Ok(())
}
