//! A container runtime's side of CNI, done the way libcni does it: each plugin of a
//! conflist is exec'ed from `CNI_PATH` with `CNI_COMMAND`, `CNI_CONTAINERID`,
//! `CNI_NETNS`, `CNI_IFNAME`, `CNI_ARGS` and its config (plus `name`, `cniVersion` and
//! `prevResult`) on stdin. Plugins run in the lab's node netns, which plays the node.
//! Debian's containernetworking-plugins provide the primary plugins; `rmq-cni` is the
//! one under test.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::netns::Netns;

/// Where Debian installs the reference plugins.
pub const DEBIAN_CNI_DIR: &str = "/usr/lib/cni";

/// `rmq-cni` built in the test's profile (next to the test binary), or `$RMQ_CNI_BIN`.
pub fn cni_binary() -> Result<PathBuf> {
    crate::agent::workspace_binary("rmq-cni", "RMQ_CNI_BIN")
}

/// The Debian plugins must be there: the CNI tests fail (not skip) without them.
pub fn require_debian_plugins() -> Result<()> {
    for p in ["bridge", "ptp", "host-local"] {
        let path = Path::new(DEBIAN_CNI_DIR).join(p);
        if !path.is_file() {
            bail!("{} is missing: install the Debian package containernetworking-plugins (scripts/setup-host.sh does)", path.display());
        }
    }
    Ok(())
}

/// One plugin run: its stdout (result or error JSON), stderr and exit status.
#[derive(Debug)]
pub struct PluginRun {
    pub plugin: String,
    pub stdout: String,
    pub stderr: String,
    pub ok: bool,
}

impl PluginRun {
    pub fn json(&self) -> Result<Value> {
        serde_json::from_str(&self.stdout).with_context(|| format!("{} printed non-JSON on stdout: {:?}", self.plugin, self.stdout))
    }
    fn into_result(self, cmd: &str) -> Result<PluginRun> {
        if !self.ok {
            bail!("{cmd} of plugin {} failed: stdout={} stderr={}", self.plugin, self.stdout.trim(), self.stderr.trim());
        }
        Ok(self)
    }
}

/// Who the pod is, as the runtime tells the plugins.
#[derive(Debug, Clone)]
pub struct PodRef {
    pub container_id: String,
    pub netns: PathBuf,
    pub ifname: String,
    pub k8s_namespace: String,
    pub k8s_name: String,
}

impl PodRef {
    pub fn new(container_id: &str, netns: &Netns, k8s_namespace: &str) -> PodRef {
        PodRef {
            container_id: container_id.into(),
            netns: netns.path(),
            ifname: "eth0".into(),
            k8s_namespace: k8s_namespace.into(),
            k8s_name: format!("pod-{container_id}"),
        }
    }
    fn cni_args(&self) -> String {
        format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={}", self.k8s_namespace, self.k8s_name)
    }
}

pub struct CniRuntime {
    node: Netns,
    conflist: Value,
    cni_path: String,
}

impl CniRuntime {
    /// `conflist` is the network's configuration, as it would sit in /etc/cni/net.d.
    pub fn new(node: Netns, conflist: Value) -> Result<CniRuntime> {
        let ours = cni_binary()?;
        let ours_dir = ours.parent().context("rmq-cni has no directory")?.display().to_string();
        Ok(CniRuntime { node, conflist, cni_path: format!("{DEBIAN_CNI_DIR}:{ours_dir}") })
    }

    /// Like [`CniRuntime::new`] with an explicit `CNI_PATH` (e.g. an installed bin dir).
    pub fn with_path(node: Netns, conflist: Value, cni_path: &str) -> Result<CniRuntime> {
        Ok(CniRuntime { node, conflist, cni_path: cni_path.to_string() })
    }

    pub fn conflist(&self) -> &Value {
        &self.conflist
    }

    fn plugins(&self) -> Vec<Value> {
        self.conflist["plugins"].as_array().cloned().unwrap_or_default()
    }

    /// Runs one plugin for `cmd`.
    pub fn exec(&self, plugin: &Value, cmd: &str, pod: &PodRef, prev: Option<&Value>) -> Result<PluginRun> {
        let kind = plugin["type"].as_str().context("plugin entry without \"type\"")?.to_string();
        let bin = self
            .cni_path
            .split(':')
            .map(|d| Path::new(d).join(&kind))
            .find(|p| p.is_file())
            .with_context(|| format!("plugin {kind} not found in CNI_PATH {}", self.cni_path))?;
        let mut conf = plugin.clone();
        conf["name"] = self.conflist["name"].clone();
        conf["cniVersion"] = self.conflist["cniVersion"].clone();
        if let Some(p) = prev {
            conf["prevResult"] = p.clone();
        }
        let mut child = self
            .node
            .command(&bin)
            .env("CNI_COMMAND", cmd)
            .env("CNI_CONTAINERID", &pod.container_id)
            .env("CNI_NETNS", &pod.netns)
            .env("CNI_IFNAME", &pod.ifname)
            .env("CNI_ARGS", pod.cni_args())
            .env("CNI_PATH", &self.cni_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("exec {}", bin.display()))?;
        child.stdin.take().context("stdin")?.write_all(conf.to_string().as_bytes())?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("plugin {kind} {cmd} hung for 60 s");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let out = child.wait_with_output()?;
        Ok(PluginRun {
            plugin: kind,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            ok: out.status.success(),
        })
    }

    /// ADD through the whole list; returns each plugin's run (the last one's stdout is the
    /// network's result). Stops at the first failure, like libcni.
    pub fn add(&self, pod: &PodRef) -> Result<Vec<PluginRun>> {
        let mut prev: Option<Value> = None;
        let mut runs = Vec::new();
        for p in self.plugins() {
            let run = self.exec(&p, "ADD", pod, prev.as_ref())?.into_result("ADD")?;
            prev = Some(run.json()?);
            runs.push(run);
        }
        Ok(runs)
    }

    /// CHECK through the list with the cached result.
    pub fn check(&self, pod: &PodRef, result: &Value) -> Result<()> {
        for p in self.plugins() {
            self.exec(&p, "CHECK", pod, Some(result))?.into_result("CHECK")?;
        }
        Ok(())
    }

    /// CHECK of one plugin type only (to read its error).
    pub fn check_plugin(&self, kind: &str, pod: &PodRef, result: &Value) -> Result<PluginRun> {
        let p = self.plugins().into_iter().find(|p| p["type"] == kind).with_context(|| format!("no {kind} in the conflist"))?;
        self.exec(&p, "CHECK", pod, Some(result))
    }

    /// DEL in reverse order, with the cached result.
    pub fn del(&self, pod: &PodRef, result: Option<&Value>) -> Result<()> {
        for p in self.plugins().iter().rev() {
            self.exec(p, "DEL", pod, result)?.into_result("DEL")?;
        }
        Ok(())
    }
}

/// The `rmq-cni` conflist entry the tests use: logs and lock in the test's workdir.
pub fn rmq_entry(workdir: &Path, capture_mode: &str) -> Value {
    json!({
        "type": "rmq-cni",
        "captureMode": capture_mode,
        "logFile": workdir.join("rmq-cni.log"),
        "lockFile": workdir.join("rmq-cni.lock"),
    })
}

/// A network of Debian `bridge` (gateway on the bridge) or `ptp` + host-local, then `rmq-cni`.
pub fn conflist(primary: &str, subnet_v4: &str, subnet_v6: &str, workdir: &Path, capture_mode: &str) -> Value {
    let ipam = json!({
        "type": "host-local",
        "ranges": [[{"subnet": subnet_v4}], [{"subnet": subnet_v6}]],
        "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}],
        "dataDir": workdir.join("ipam"),
    });
    let first = match primary {
        "bridge" => json!({"type": "bridge", "bridge": "rmqbr0", "isGateway": true, "ipMasq": false, "ipam": ipam}),
        "ptp" => json!({"type": "ptp", "ipMasq": false, "ipam": ipam}),
        other => panic!("no conflist for {other}"),
    };
    json!({"cniVersion": "1.0.0", "name": format!("rmq-{primary}"), "plugins": [first, rmq_entry(workdir, capture_mode)]})
}

/// Runs `rmq-cni` alone (as the last plugin of a chain) with a given prevResult.
pub fn exec_rmq_cni(node: &Netns, entry: &Value, cmd: &str, container_id: &str, namespace: &str, prev: &Value) -> Result<PluginRun> {
    let rt = CniRuntime::new(node.clone(), json!({"cniVersion": "1.0.0", "name": "rmq-lab", "plugins": [entry]}))?;
    let pod = PodRef {
        container_id: container_id.into(),
        netns: PathBuf::from("/run/netns/none"),
        ifname: "eth0".into(),
        k8s_namespace: namespace.into(),
        k8s_name: format!("pod-{container_id}"),
    };
    rt.exec(entry, cmd, &pod, Some(prev))
}

/// A prevResult as a routed-veth plugin (ptp) returns it.
pub fn veth_prev_result(host_if: &str, pod_netns: &Path, addrs: &[&str]) -> Value {
    let ips: Vec<Value> = addrs.iter().map(|a| json!({"interface": 1, "address": a})).collect();
    json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": host_if}, {"name": "eth0", "sandbox": pod_netns}],
        "ips": ips,
        "dns": {}
    })
}

/// Our chains as `iptables -S` prints them (v4 or v6), in a stable order.
pub fn our_rules(node: &Netns, v6: bool) -> Result<Vec<String>> {
    our_rules_in(node, v6, false)
}

/// Like [`our_rules`], from the legacy backend's tables when `legacy`.
pub fn our_rules_in(node: &Netns, v6: bool, legacy: bool) -> Result<Vec<String>> {
    let ipt = match (v6, legacy) {
        (false, false) => "iptables",
        (true, false) => "ip6tables",
        (false, true) => "iptables-legacy",
        (true, true) => "ip6tables-legacy",
    };
    let mut out = Vec::new();
    for (table, chain) in [
        ("mangle", "PREROUTING"),
        ("mangle", rmq_common::CHAIN_DIVERT),
        ("mangle", rmq_common::CHAIN_TPROXY),
        ("nat", "PREROUTING"),
        ("nat", rmq_common::CHAIN_REDIRECT),
    ] {
        let o = Command::new("ip").args(["netns", "exec", node.name(), ipt, "-w", "5", "-t", table, "-S", chain]).output()?;
        if o.status.success() {
            out.extend(String::from_utf8_lossy(&o.stdout).lines().filter(|l| l.starts_with("-A ")).map(|l| format!("-t {table} {l}")));
        }
    }
    Ok(out)
}
