//! The real RocketMQ peers (rocketmq-rust name server + broker, compat flavour) running
//! inside the lab's broker netns, started and stopped with `tests/peers/{start,stop}.sh`.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};

use crate::lab::{repo_root, Lab, BROKER_V4};
use crate::netns::check_output;

pub use rmq_common::{BROKER_PORT, NAMESRV_PORT};
/// The broker's HA listener (`BROKER_PORT + 1` in start.sh): a live port that is not
/// one of the captured RocketMQ ports.
pub const BROKER_HA_PORT: u16 = 10912;

/// `$RMQ_PEERS_HOME`, default `~/.cache/rmq-agent/peers` (what `scripts/install-peers.sh` fills).
pub fn peers_home() -> PathBuf {
    match std::env::var_os("RMQ_PEERS_HOME") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cache/rmq-agent/peers"),
    }
}

/// Fails with what to run when an installed peer file is missing.
pub fn require_installed(rel: &str) -> Result<PathBuf> {
    let p = peers_home().join(rel);
    ensure!(
        p.exists(),
        "{} is missing: install the peers first with `scripts/install-peers.sh` \
         (or point RMQ_PEERS_HOME at an installed copy)",
        p.display()
    );
    Ok(p)
}

pub struct Peers<'lab> {
    lab: &'lab Lab,
    bind_ip: IpAddr,
    /// The name server its broker registers with (its own unless started by `start_broker`).
    namesrv: SocketAddr,
    data_dir: PathBuf,
    stopped: bool,
}

impl<'lab> Peers<'lab> {
    /// Starts name server + broker in `<prefix>-brk`, bound to 10.200.2.2.
    pub fn start(lab: &'lab Lab) -> Result<Peers<'lab>> {
        Self::start_on(lab, IpAddr::V4(BROKER_V4))
    }

    /// Starts name server + broker in `<prefix>-brk`, bound to (and advertising) `bind_ip`.
    pub fn start_on(lab: &'lab Lab, bind_ip: IpAddr) -> Result<Peers<'lab>> {
        let tag = if bind_ip.is_ipv6() { "v6" } else { "v4" };
        Self::launch(lab, bind_ip, None, &format!("peers-{tag}"), &[])
    }

    /// Starts only a broker named `name` in `<prefix>-brk`, bound to `bind_ip` (e.g. the lab's
    /// second broker address), registered with `namesrv` (a running name server): a second
    /// broker of the same cluster.
    pub fn start_broker(lab: &'lab Lab, bind_ip: IpAddr, name: &str, namesrv: SocketAddr) -> Result<Peers<'lab>> {
        Self::launch(lab, bind_ip, Some(namesrv), &format!("broker-{name}"), &[format!("BROKER_NAME={name}"), format!("NAMESRV={namesrv}")])
    }

    fn launch(lab: &'lab Lab, bind_ip: IpAddr, namesrv: Option<SocketAddr>, dir: &str, env: &[String]) -> Result<Peers<'lab>> {
        require_installed("bin/rocketmq-namesrv-rust-compat")?;
        require_installed("bin/rocketmq-broker-rust-compat")?;
        let data_dir = lab.workdir().join(dir);
        let namesrv = namesrv.unwrap_or(SocketAddr::new(bind_ip, NAMESRV_PORT));
        let mut peers = Peers { lab, bind_ip, namesrv, data_dir, stopped: false };
        let out = lab
            .brk()
            .command("env")
            .arg(format!("BIND_IP={bind_ip}"))
            .arg(format!("RMQ_PEERS_HOME={}", peers_home().display()))
            .args(env)
            .arg(repo_root().join("tests/peers/start.sh"))
            .args([NAMESRV_PORT.to_string(), BROKER_PORT.to_string()])
            .arg(&peers.data_dir)
            .output()
            .context("run tests/peers/start.sh in the broker netns")?;
        if let Err(e) = check_output("tests/peers/start.sh (broker netns)", out) {
            peers.stop();
            return Err(e.context(format!("peer logs are in {}", peers.data_dir.display())));
        }
        Ok(peers)
    }

    pub fn namesrv(&self) -> SocketAddr {
        self.namesrv
    }

    pub fn broker(&self) -> SocketAddr {
        SocketAddr::new(self.bind_ip, BROKER_PORT)
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The broker's PID (from start.sh's PID file), e.g. to freeze it.
    pub fn broker_pid(&self) -> Result<i32> {
        let f = self.data_dir.join("broker.pid");
        std::fs::read_to_string(&f).with_context(|| format!("read {}", f.display()))?.trim().parse().context("broker.pid")
    }

    pub fn broker_log(&self) -> Result<String> {
        std::fs::read_to_string(self.data_dir.join("broker.log")).context("read broker.log")
    }

    /// Stops both servers by their PID files (`tests/peers/stop.sh`); idempotent.
    pub fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        let out = std::process::Command::new(repo_root().join("tests/peers/stop.sh"))
            .arg(BROKER_PORT.to_string())
            .arg(&self.data_dir)
            .output();
        match out.map(|o| check_output("tests/peers/stop.sh", o)) {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => eprintln!("{e:#}"),
            Err(e) => eprintln!("tests/peers/stop.sh: {e}"),
        }
        let _ = self.lab; // the borrow keeps the lab (and its netns) alive until we are done
    }
}

impl Drop for Peers<'_> {
    fn drop(&mut self) {
        self.stop();
    }
}
