//! The namespace lab (`scripts/lab.sh`): pod(s) -> node (router, agent, capture) -> broker.
//!
//! ```text
//!  <p>-pod  eth0 10.200.1.2 fd00:200:1::2  ─ pod0 10.200.1.1 fd00:200:1::1 ┐
//!  <p>-pod2 eth0 10.200.3.2 fd00:200:3::2  ─ pod1 10.200.3.1 fd00:200:3::1 ├ <p>-node
//!  <p>-brk  eth0 10.200.2.2 (+10.200.2.3/32, no listener) fd00:200:2::2   │
//!                                          ─ brk0 10.200.2.1 fd00:200:2::1 ┘
//! ```
//! `<p>-cni` is an empty pod sandbox that the CNI tests wire up with real plugins.
//! `Lab::up` builds it; dropping the `Lab` runs `lab.sh down`, which kills whatever
//! still runs in its namespaces and deletes them. Peers and the agent borrow the lab,
//! so they are always stopped before it goes down.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::netns::{check_output, Netns};

pub const POD_V4: Ipv4Addr = Ipv4Addr::new(10, 200, 1, 2);
pub const POD_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 1, 0, 0, 0, 0, 2);
pub const POD2_V4: Ipv4Addr = Ipv4Addr::new(10, 200, 3, 2);
/// The node's address on the pod's veth (the pod's default gateway).
pub const NODE_POD_SIDE_V4: Ipv4Addr = Ipv4Addr::new(10, 200, 1, 1);
/// The node's address on the broker's veth: the source the broker sees without spoofing.
pub const NODE_BRK_SIDE_V4: Ipv4Addr = Ipv4Addr::new(10, 200, 2, 1);
pub const NODE_BRK_SIDE_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 2, 0, 0, 0, 0, 1);
pub const BROKER_V4: Ipv4Addr = Ipv4Addr::new(10, 200, 2, 2);
pub const BROKER_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 2, 0, 0, 0, 0, 2);
/// Routed to the broker netns, but nothing listens there: a broker that is down.
pub const DOWN_BROKER_V4: Ipv4Addr = Ipv4Addr::new(10, 200, 2, 3);

pub struct Lab {
    prefix: String,
    namespaces: Vec<String>,
    workdir: PathBuf,
}

impl Lab {
    /// Builds the topology for `prefix` (namespaces `<prefix>-pod`, `-pod2`, `-node`,
    /// `-brk`). Refuses to run outside the sandbox.
    pub fn up(prefix: &str) -> Result<Lab> {
        crate::sandbox::enter();
        crate::sandbox::guard().context("refusing to build a lab outside the sandbox")?;
        let namespaces = ["pod", "pod2", "node", "brk", "cni"].iter().map(|r| format!("{prefix}-{r}")).collect();
        let workdir = PathBuf::from("/tmp/rmq-e2e").join(format!("{prefix}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&workdir);
        std::fs::create_dir_all(&workdir).with_context(|| format!("create {}", workdir.display()))?;
        let lab = Lab { prefix: prefix.to_string(), namespaces, workdir };
        let out = Command::new(repo_root().join("scripts/lab.sh"))
            .args(["up", prefix])
            .output()
            .context("run scripts/lab.sh up")?;
        check_output(&format!("scripts/lab.sh up {prefix}"), out)?;
        Ok(lab)
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Per-test scratch directory (logs, peer data, PID files) under /tmp/rmq-e2e.
    pub fn workdir(&self) -> &Path {
        &self.workdir
    }

    pub fn pod(&self) -> Netns {
        self.netns("pod")
    }
    pub fn pod2(&self) -> Netns {
        self.netns("pod2")
    }
    pub fn node(&self) -> Netns {
        self.netns("node")
    }
    pub fn brk(&self) -> Netns {
        self.netns("brk")
    }
    /// An empty pod sandbox (only `lo`) for the CNI tests.
    pub fn cni_pod(&self) -> Netns {
        self.netns("cni")
    }

    /// `<prefix>-<role>`; panics for a role the lab does not have.
    pub fn netns(&self, role: &str) -> Netns {
        Netns::of_lab(format!("{}-{role}", self.prefix), &self.namespaces)
    }

    /// Captures the lab pod (IPv4 and IPv6) the way a node does: by calling `rmq-cni`
    /// ADD in the node netns as the last plugin of the pod's chain, with the prevResult
    /// a routed-veth plugin would hand it. `ports` overrides the captured destination
    /// ports (comma list; default: the RocketMQ ports).
    pub fn capture_pod(&self, ports: Option<&str>) -> Result<()> {
        self.capture("pod", "pod0", &[&format!("{POD_V4}/24"), &format!("{POD_V6}/64")], ports)
    }

    /// Like [`Lab::capture_pod`] for the second pod (10.200.3.2).
    pub fn capture_pod2(&self) -> Result<()> {
        self.capture("pod2", "pod1", &[&format!("{POD2_V4}/24")], None)
    }

    /// CNI DEL of the second pod's capture (what the runtime runs when it is deleted).
    pub fn release_pod2(&self) -> Result<()> {
        let entry = crate::cni::rmq_entry(&self.workdir, "auto");
        let run = crate::cni::exec_rmq_cni(&self.node(), &entry, "DEL", &format!("{}-pod2", self.prefix), "default", &serde_json::json!({}))?;
        anyhow::ensure!(run.ok, "rmq-cni DEL for pod2 failed: {} {}", run.stdout, run.stderr);
        Ok(())
    }

    fn capture(&self, role: &str, host_if: &str, addrs: &[&str], ports: Option<&str>) -> Result<()> {
        let mut entry = crate::cni::rmq_entry(&self.workdir, "auto");
        if let Some(p) = ports {
            let list: Vec<u16> = p.split(',').map(|x| x.trim().parse()).collect::<Result<_, _>>().context("ports")?;
            entry["ports"] = serde_json::json!(list);
        }
        let prev = crate::cni::veth_prev_result(host_if, &self.netns(role).path(), addrs);
        let run = crate::cni::exec_rmq_cni(&self.node(), &entry, "ADD", &format!("{}-{role}", self.prefix), "default", &prev)?;
        if !run.ok {
            anyhow::bail!("rmq-cni ADD for the lab's {role} failed: {} {}", run.stdout, run.stderr);
        }
        Ok(())
    }

    /// Lists established TCP connections whose local port is `port` inside `ns`, as
    /// (local, peer) address strings, e.g. to see who the broker is talking to.
    pub fn established(&self, ns: &Netns, port: u16) -> Result<Vec<(String, String)>> {
        let out = ns.sh(&format!("ss -Htn state established '( sport = :{port} )'"))?;
        Ok(out
            .lines()
            .filter_map(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                // Recv-Q Send-Q Local Peer
                (cols.len() >= 4).then(|| (cols[2].to_string(), cols[3].to_string()))
            })
            .collect())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        match Command::new(repo_root().join("scripts/lab.sh")).args(["down", &self.prefix]).output() {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!("lab.sh down {} failed: {}", self.prefix, String::from_utf8_lossy(&o.stderr)),
            Err(e) => eprintln!("lab.sh down {} failed: {e}", self.prefix),
        }
    }
}

/// The workspace root (the directory holding `scripts/` and `tests/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// Polls `f` every 50 ms until it returns `Ok(Some(v))` or `timeout` passes; the error
/// names `what` and the last failure.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    let mut last_err = None;
    loop {
        match f() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if Instant::now() >= deadline {
            return Err(match last_err {
                Some(e) => e.context(format!("timed out after {timeout:?} waiting for {what}")),
                None => anyhow::anyhow!("timed out after {timeout:?} waiting for {what}"),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `ip:port` with brackets for IPv6, as RocketMQ clients expect.
pub fn host_port(ip: IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(ip, port).to_string()
}
