//! The CNI verbs (spec 1.0.0): what the container runtime calls us for.
//! Exit status and stdout follow the spec: the result (ADD) or error JSON on stdout,
//! everything else in the log.
use std::io::Read;

use crate::backend::{self, Xtables};
use crate::capture::{self, Node, PodCapture};
use crate::conf::{Env, NetConf, SUPPORTED_VERSIONS};
use crate::error::{CniError, Code};
use crate::lock::PluginLock;
use crate::log;
use crate::route::{self, Netlink};

/// What the process prints and its exit status.
pub struct Outcome {
    pub stdout: String,
    pub exit: i32,
}

/// Runs one invocation from the real environment and stdin.
pub fn run_from_env() -> Outcome {
    let env = Env::from_env().unwrap_or_default();
    let mut stdin = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut stdin) {
        let err = CniError::new(Code::Io, "cannot read the network configuration from stdin", e.to_string());
        return failed(&err, "1.0.0");
    }
    run(&env, &stdin)
}

pub fn run(env: &Env, stdin: &[u8]) -> Outcome {
    if env.command == "VERSION" {
        return Outcome { stdout: version_json(), exit: 0 };
    }
    let conf = match NetConf::parse(stdin) {
        Ok(c) => c,
        // DEL must not wedge pod teardown on a config we cannot read: there is nothing
        // of ours to find without the container ID, which comes from the environment.
        Err(e) if env.command == "DEL" => {
            log::init(None, context(env));
            log::warn(format!("DEL with an unreadable config ({e}); removing by container ID with defaults"));
            return match del_with_defaults(env) {
                Ok(()) => Outcome { stdout: String::new(), exit: 0 },
                Err(e) => failed(&e, "1.0.0"),
            };
        }
        Err(e) => return failed(&e, "1.0.0"),
    };
    log::init(Some(conf.log_file.as_deref().unwrap_or(crate::conf::DEFAULT_LOG_FILE)), context(env));
    let result = match env.command.as_str() {
        "ADD" => add(env, &conf),
        "DEL" => del(env, &conf).map(|()| String::new()),
        "CHECK" => check(env, &conf).map(|()| String::new()),
        other => Err(CniError::new(
            Code::InvalidEnv,
            format!("unknown CNI_COMMAND {other:?}"),
            "rmq-cni implements ADD, DEL, CHECK and VERSION (CNI spec 1.0.0)",
        )),
    };
    match result {
        Ok(stdout) => Outcome { stdout, exit: 0 },
        Err(e) => {
            log::error(format!("{} failed: {e}", env.command));
            failed(&e, &conf.cni_version)
        }
    }
}

fn failed(e: &CniError, version: &str) -> Outcome {
    Outcome { stdout: e.to_json(version), exit: 1 }
}

fn context(env: &Env) -> String {
    let ns = env.pod_namespace().unwrap_or("-");
    let pod = env.args.get("K8S_POD_NAME").map(String::as_str).unwrap_or("-");
    format!("{} container={} pod={ns}/{pod}", env.command, env.container_id)
}

pub fn version_json() -> String {
    serde_json::json!({ "cniVersion": "1.0.0", "supportedVersions": SUPPORTED_VERSIONS }).to_string()
}

/// The previous plugin's result, verbatim: a chained plugin must hand it on unchanged.
fn passthrough(conf: &NetConf) -> String {
    conf.prev_result.as_ref().map(|r| r.get().to_string()).unwrap_or_default()
}

fn require_prev(conf: &NetConf, verb: &str) -> Result<crate::conf::PrevResult, CniError> {
    conf.prev_result()?.ok_or_else(|| {
        CniError::new(
            Code::InvalidConfig,
            format!("{verb} got no prevResult: rmq-cni is a chained plugin"),
            "list it after the primary network plugin (bridge, ptp, calico, ...) in the conflist",
        )
    })
}

/// The node's iptables backend, detected once per run (bounded by the time limit).
fn node_backend(conf: &NetConf) -> Result<Xtables, CniError> {
    let flavor = backend::detect(conf.iptables_backend, conf.timeout()).map_err(backend_err)?;
    Xtables::new(flavor, conf.timeout()).map_err(backend_err)
}

/// Runs `f` on the node's handles under the plugin lock.
fn with_node<T>(conf: &NetConf, f: impl FnOnce(&Node) -> Result<T, CniError>) -> Result<T, CniError> {
    let xt = node_backend(conf)?;
    with_backend(conf, &xt, f)
}

fn with_backend<T>(conf: &NetConf, xt: &Xtables, f: impl FnOnce(&Node) -> Result<T, CniError>) -> Result<T, CniError> {
    let _lock = PluginLock::acquire(conf.lock_file(), conf.lock_timeout())?;
    let nl = Netlink::new(conf.timeout());
    f(&Node { backend: xt, routing: &nl })
}

fn backend_err(e: backend::BackendError) -> CniError {
    let code = if matches!(e, backend::BackendError::Timeout(_)) { Code::TryAgainLater } else { Code::CaptureInstall };
    CniError::new(code, "rmq-cni cannot use the node's iptables", e.to_string())
}

fn pod_capture(env: &Env, conf: &NetConf, prev: &crate::conf::PrevResult, node: &Node) -> Result<PodCapture, CniError> {
    let ips = prev.pod_ips()?;
    let targets = capture::resolve_modes(conf.capture_mode, &ips, &prev.host_interfaces(), node.routing, route::bridge_nf_call)?;
    Ok(PodCapture {
        container_id: env.checked_container_id()?.to_string(),
        targets,
        ports: conf.ports(),
        agent_port: conf.agent_port(),
    })
}

fn add(env: &Env, conf: &NetConf) -> Result<String, CniError> {
    let prev = require_prev(conf, "ADD")?;
    env.checked_container_id()?;
    if conf.is_excluded(env.pod_namespace()) {
        log::info("namespace is excluded: passing the pod through uncaptured");
        let ips = prev.pod_ips()?;
        // Its IP may have been a captured pod's whose DEL never ran. Skipped without our
        // chains (the agent's own pod at first install never waits on the lock) or iptables.
        if let Some(xt) = (!ips.is_empty()).then(|| node_backend(conf).ok()).flatten().filter(has_our_chains) {
            let id = env.checked_container_id()?;
            with_backend(conf, &xt, |node| capture::purge_stale(node, &ips, &conf.ports(), id))?;
        }
        return Ok(passthrough(conf));
    }
    if prev.pod_ips()?.is_empty() {
        log::warn("prevResult lists no IP address: nothing to capture");
        return Ok(passthrough(conf));
    }
    with_node(conf, |node| {
        let pod = pod_capture(env, conf, &prev, node)?;
        capture::add(node, &pod)?;
        let modes: Vec<String> = pod.targets.iter().map(|(ip, m)| format!("{ip}={m}")).collect();
        log::info(format!("captured {} via {} (ports {:?} -> {})", modes.join(" "), node.backend.name(), pod.ports, pod.agent_port));
        Ok(())
    })?;
    Ok(passthrough(conf))
}

fn has_our_chains(xt: &Xtables) -> bool {
    use crate::backend::RuleBackend;
    [crate::rules::Family::V4, crate::rules::Family::V6].iter().any(|f| {
        [("mangle", rmq_common::CHAIN_TPROXY), ("nat", rmq_common::CHAIN_REDIRECT)]
            .iter()
            .any(|(t, c)| xt.chain_exists(*f, t, c).unwrap_or(false))
    })
}

fn del(env: &Env, conf: &NetConf) -> Result<(), CniError> {
    let id = env.checked_container_id()?;
    let removed = with_node(conf, |node| capture::del(node, id))?;
    log::info(format!("removed {removed} rule(s)"));
    Ok(())
}

fn del_with_defaults(env: &Env) -> Result<(), CniError> {
    let conf = NetConf::parse(br#"{"cniVersion":"1.0.0"}"#)?;
    del(env, &conf)
}

fn check(env: &Env, conf: &NetConf) -> Result<(), CniError> {
    let prev = require_prev(conf, "CHECK")?;
    env.checked_container_id()?;
    if conf.is_excluded(env.pod_namespace()) || prev.pod_ips()?.is_empty() {
        return Ok(());
    }
    with_node(conf, |node| {
        let pod = pod_capture(env, conf, &prev, node)?;
        capture::check(node, &pod)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(cmd: &str) -> Env {
        Env { command: cmd.into(), container_id: "c1".into(), ..Default::default() }
    }

    #[test]
    fn version_lists_1_0_0_and_0_4_0() {
        let o = run(&env("VERSION"), br#"{"cniVersion":"1.0.0"}"#);
        assert_eq!(o.exit, 0);
        let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
        let list: Vec<&str> = v["supportedVersions"].as_array().unwrap().iter().map(|x| x.as_str().unwrap()).collect();
        assert!(list.contains(&"1.0.0") && list.contains(&"0.4.0"));
    }

    #[test]
    fn add_without_prev_result_is_a_config_error() {
        let o = run(&env("ADD"), br#"{"cniVersion":"1.0.0","name":"n","type":"rmq-cni","logFile":"/dev/null"}"#);
        assert_eq!(o.exit, 1);
        let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
        assert_eq!(v["code"], Code::InvalidConfig as u32);
        assert!(v["msg"].as_str().unwrap().contains("chained"));
    }

    #[test]
    fn excluded_namespace_passes_prev_result_through_byte_for_byte() {
        let prev = r#"{"cniVersion":"1.0.0", "ips":[{"address":"10.1.0.2/24"}],"dns":{}}"#;
        let conf = format!(r#"{{"cniVersion":"1.0.0","name":"n","type":"rmq-cni","logFile":"/dev/null","prevResult":{prev}}}"#);
        let mut e = env("ADD");
        e.args.insert("K8S_POD_NAMESPACE".into(), "kube-system".into());
        let o = run(&e, conf.as_bytes());
        assert_eq!(o.exit, 0);
        assert_eq!(o.stdout, prev);
    }

    #[test]
    fn unknown_command_is_an_error() {
        let o = run(&env("GC"), br#"{"cniVersion":"1.0.0","logFile":"/dev/null"}"#);
        assert_eq!(o.exit, 1);
        assert!(o.stdout.contains("unknown CNI_COMMAND"));
    }
}
