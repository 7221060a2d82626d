//! What the runtime hands us: the network configuration on stdin (with `prevResult`)
//! and the `CNI_*` environment.
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::{CniError, Code};
use rmq_common::{AGENT_PORT, DEFAULT_ROCKETMQ_PORTS};

/// Spec versions whose configs and results we understand (the result shape we
/// read, `ips[].address` and `interfaces[]`, is the same in all of them).
pub const SUPPORTED_VERSIONS: [&str; 4] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0"];
/// The agent's own namespace (deploy/namespace.yaml); its pods are never captured.
pub const DEFAULT_AGENT_NAMESPACE: &str = "rmq-system";
pub const DEFAULT_LOG_FILE: &str = "/var/log/rmq-cni.log";
/// Serialises our read-modify-write of the rule set between concurrent plugin runs.
pub const DEFAULT_LOCK_FILE: &str = "/run/rmq-cni.lock";
/// The `type` of our entry in a conflist, also the binary's name.
pub const PLUGIN_TYPE: &str = "rmq-cni";
/// iptables' multiport match takes at most 15 ports.
const MAX_PORTS: usize = 15;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum CaptureSetting {
    Tproxy,
    Redirect,
    #[default]
    Auto,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BackendSetting {
    #[default]
    Auto,
    Nft,
    Legacy,
}

/// Our entry of the conflist, as the runtime passes it (name and cniVersion filled in).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub capture_mode: CaptureSetting,
    /// Destination ports to capture; default: the RocketMQ ports.
    pub ports: Option<Vec<u16>>,
    /// The agent's listener port; default: the shared agent port.
    pub agent_port: Option<u16>,
    /// Namespaces whose pods are passed through; default: kube-system + agentNamespace.
    pub exclude_namespaces: Option<Vec<String>>,
    pub agent_namespace: Option<String>,
    pub log_file: Option<String>,
    pub lock_file: Option<String>,
    #[serde(default)]
    pub iptables_backend: BackendSetting,
    /// Time limit of each external call (iptables, netlink), in milliseconds.
    pub timeout_ms: Option<u64>,
    /// How long to wait for other rmq-cni runs (parallel pod starts), in milliseconds.
    pub lock_timeout_ms: Option<u64>,
    pub prev_result: Option<Box<RawValue>>,
}

impl NetConf {
    pub fn parse(stdin: &[u8]) -> Result<Self, CniError> {
        let conf: NetConf = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(Code::Decode, "cannot decode the network configuration on stdin", e.to_string())
        })?;
        if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
            return Err(CniError::new(
                Code::IncompatibleVersion,
                format!("rmq-cni does not support cniVersion {:?}", conf.cni_version),
                format!("supported: {}", SUPPORTED_VERSIONS.join(", ")),
            ));
        }
        let ports = conf.ports();
        if ports.is_empty() || ports.len() > MAX_PORTS || ports.contains(&0) {
            return Err(CniError::new(
                Code::InvalidConfig,
                "invalid \"ports\" in the rmq-cni conflist entry",
                format!("give 1 to {MAX_PORTS} non-zero TCP ports, got {ports:?}"),
            ));
        }
        if conf.agent_port == Some(0) {
            return Err(CniError::new(Code::InvalidConfig, "invalid \"agentPort\" 0", ""));
        }
        Ok(conf)
    }

    pub fn ports(&self) -> Vec<u16> {
        self.ports.clone().unwrap_or_else(|| DEFAULT_ROCKETMQ_PORTS.to_vec())
    }

    pub fn agent_port(&self) -> u16 {
        self.agent_port.unwrap_or(AGENT_PORT)
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms.unwrap_or(5000).max(100))
    }

    pub fn lock_timeout(&self) -> Duration {
        Duration::from_millis(self.lock_timeout_ms.unwrap_or(30_000).max(100))
    }

    pub fn lock_file(&self) -> &str {
        self.lock_file.as_deref().unwrap_or(DEFAULT_LOCK_FILE)
    }

    pub fn is_excluded(&self, namespace: Option<&str>) -> bool {
        let Some(ns) = namespace else { return false };
        match &self.exclude_namespaces {
            Some(list) => list.iter().any(|n| n == ns),
            None => ns == "kube-system" || ns == self.agent_namespace.as_deref().unwrap_or(DEFAULT_AGENT_NAMESPACE),
        }
    }

    pub fn prev_result(&self) -> Result<Option<PrevResult>, CniError> {
        let Some(raw) = &self.prev_result else { return Ok(None) };
        serde_json::from_str(raw.get()).map(Some).map_err(|e| {
            CniError::new(Code::Decode, "cannot decode prevResult", e.to_string())
        })
    }
}

/// The parts of the previous plugin's result that we read.
#[derive(Debug, Deserialize, Default)]
pub struct PrevResult {
    #[serde(default)]
    pub interfaces: Vec<Interface>,
    #[serde(default)]
    pub ips: Vec<IpConfig>,
}

#[derive(Debug, Deserialize)]
pub struct Interface {
    pub name: String,
    /// Set for interfaces inside the pod; absent for host-side ones.
    #[serde(default)]
    pub sandbox: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct IpConfig {
    /// CIDR notation, e.g. "10.22.0.5/24".
    pub address: String,
}

impl PrevResult {
    /// The pod's addresses, IPv4 first, without duplicates.
    pub fn pod_ips(&self) -> Result<Vec<IpAddr>, CniError> {
        let mut out = Vec::new();
        for ip in &self.ips {
            let host = ip.address.split('/').next().unwrap_or_default();
            let addr: IpAddr = host.parse().map_err(|_| {
                CniError::new(Code::Decode, format!("prevResult has an invalid address {:?}", ip.address), "")
            })?;
            if !out.contains(&addr) {
                out.push(addr);
            }
        }
        out.sort_by_key(|a| a.is_ipv6());
        Ok(out)
    }

    /// Host-side interfaces (those without a sandbox): a bridge and/or the host veth.
    pub fn host_interfaces(&self) -> Vec<&str> {
        self.interfaces.iter().filter(|i| i.sandbox.as_deref().unwrap_or("").is_empty()).map(|i| i.name.as_str()).collect()
    }
}

/// The `CNI_*` environment of one invocation.
#[derive(Debug, Clone, Default)]
pub struct Env {
    pub command: String,
    pub container_id: String,
    pub ifname: String,
    pub netns: String,
    pub args: BTreeMap<String, String>,
}

impl Env {
    pub fn from_env() -> Result<Self, CniError> {
        let get = |k: &str| std::env::var(k).unwrap_or_default();
        let env = Env {
            command: get("CNI_COMMAND"),
            container_id: get("CNI_CONTAINERID"),
            ifname: get("CNI_IFNAME"),
            netns: get("CNI_NETNS"),
            args: parse_cni_args(&get("CNI_ARGS")),
        };
        Ok(env)
    }

    /// The container ID goes into an iptables comment, so only the characters the
    /// spec allows are accepted (alphanumerics, `_`, `.`, `-`).
    pub fn checked_container_id(&self) -> Result<&str, CniError> {
        let id = self.container_id.as_str();
        let ok = !id.is_empty()
            && id.len() <= 200
            && id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        if ok {
            Ok(id)
        } else {
            Err(CniError::new(
                Code::InvalidEnv,
                format!("invalid CNI_CONTAINERID {id:?}"),
                "it must be non-empty and contain only letters, digits, '_', '.' and '-'",
            ))
        }
    }

    pub fn pod_namespace(&self) -> Option<&str> {
        self.args.get("K8S_POD_NAMESPACE").map(String::as_str)
    }
}

/// `CNI_ARGS` is `K=V;K=V`.
pub fn parse_cni_args(s: &str) -> BTreeMap<String, String> {
    s.split(';')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const BRIDGE_PREV: &str = r#"{"cniVersion":"1.0.0","interfaces":[{"name":"cni0","mac":"aa"},{"name":"veth1","mac":"bb"},{"name":"eth0","sandbox":"/run/netns/p"}],
        "ips":[{"interface":2,"address":"fd00::5/64"},{"interface":2,"address":"10.22.0.5/24","gateway":"10.22.0.1"}],"routes":[],"dns":{}}"#;

    fn conf(extra: &str) -> NetConf {
        let s = format!(r#"{{"cniVersion":"1.0.0","name":"n","type":"rmq-cni"{extra},"prevResult":{BRIDGE_PREV}}}"#);
        NetConf::parse(s.as_bytes()).unwrap()
    }

    #[test]
    fn defaults_come_from_common() {
        let c = conf("");
        assert_eq!(c.ports(), DEFAULT_ROCKETMQ_PORTS.to_vec());
        assert_eq!(c.agent_port(), AGENT_PORT);
        assert_eq!(c.capture_mode, CaptureSetting::Auto);
        assert!(c.is_excluded(Some("kube-system")));
        assert!(c.is_excluded(Some(DEFAULT_AGENT_NAMESPACE)));
        assert!(!c.is_excluded(Some("default")));
        assert!(!c.is_excluded(None));
    }

    #[test]
    fn prev_result_ips_and_host_ifaces() {
        let p = conf("").prev_result().unwrap().unwrap();
        let ips = p.pod_ips().unwrap();
        assert_eq!(ips, vec!["10.22.0.5".parse::<IpAddr>().unwrap(), "fd00::5".parse().unwrap()]);
        assert_eq!(p.host_interfaces(), vec!["cni0", "veth1"]);
    }

    #[test]
    fn custom_keys() {
        let c = conf(r#","captureMode":"redirect","ports":[1234],"agentPort":15999,"excludeNamespaces":["x"]"#);
        assert_eq!(c.capture_mode, CaptureSetting::Redirect);
        assert_eq!(c.ports(), vec![1234]);
        assert_eq!(c.agent_port(), 15999);
        assert!(c.is_excluded(Some("x")));
        assert!(!c.is_excluded(Some("kube-system")));
    }

    #[test]
    fn rejects_bad_versions_and_ports() {
        let e = NetConf::parse(br#"{"cniVersion":"9.9.9"}"#).unwrap_err();
        assert_eq!(e.code(), Code::IncompatibleVersion);
        let e = NetConf::parse(br#"{"cniVersion":"1.0.0","ports":[]}"#).unwrap_err();
        assert_eq!(e.code(), Code::InvalidConfig);
        let e = NetConf::parse(b"not json").unwrap_err();
        assert_eq!(e.code(), Code::Decode);
    }

    #[test]
    fn cni_args_and_container_id() {
        let a = parse_cni_args("IgnoreUnknown=1;K8S_POD_NAMESPACE=ns1;K8S_POD_NAME=p");
        assert_eq!(a.get("K8S_POD_NAMESPACE").unwrap(), "ns1");
        let env = Env { container_id: "abc def".into(), ..Default::default() };
        assert!(env.checked_container_id().is_err());
        let env = Env { container_id: "abc-1.2_x".into(), ..Default::default() };
        assert_eq!(env.checked_container_id().unwrap(), "abc-1.2_x");
    }
}
