//! The deployment artifacts: manifests valid against the Kubernetes schemas
//! (kubernetes-validate, schemas bundled in the package), the DaemonSet
//! properties an upgrade and the security posture depend on, a ConfigMap the
//! agent itself accepts, and a Dockerfile that builds what the DaemonSet runs.
rmq_e2e::sandboxed_test_binary!();

use std::process::Command;

use anyhow::{ensure, Context, Result};
use clap::{Args, Command as Cli};
use rmq_agent::config::RunArgs;
use rmq_e2e::lab::repo_root;
use serde_yaml::Value;

fn yaml(name: &str) -> Result<Value> {
    let path = repo_root().join("deploy").join(name);
    serde_yaml::from_str(&std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?).context(name.to_string())
}

#[test]
fn manifests_validate_against_kubernetes_schemas() -> Result<()> {
    let out = Command::new(repo_root().join("scripts/validate-manifests.sh")).output().context("run scripts/validate-manifests.sh")?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    ensure!(out.status.success(), "manifest validation failed:\n{text}");
    ensure!(text.matches(" passed for resource ").count() == 4, "expected 4 validated resources:\n{text}");
    Ok(())
}

#[test]
fn daemonset_is_built_for_hitless_upgrades_and_least_privilege() -> Result<()> {
    let ds = yaml("daemonset.yaml")?;
    let spec = &ds["spec"];
    let pod = &spec["template"]["spec"];
    ensure!(pod["hostNetwork"] == Value::Bool(true), "needs hostNetwork: rules and the listener live in the node netns");
    let ru = &spec["updateStrategy"]["rollingUpdate"];
    ensure!(ru["maxSurge"] == Value::from(1) && ru["maxUnavailable"] == Value::from(0), "upgrade must surge: {ru:?}");
    let c = &pod["containers"][0];
    let caps = &c["securityContext"]["capabilities"];
    ensure!(caps["drop"] == serde_yaml::from_str::<Value>("[ALL]")?, "drop ALL capabilities: {caps:?}");
    ensure!(caps["add"] == serde_yaml::from_str::<Value>("[NET_ADMIN, NET_RAW]")?, "only NET_ADMIN and NET_RAW: {caps:?}");
    ensure!(c["securityContext"]["allowPrivilegeEscalation"] == Value::Bool(false));
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let g = &c[probe]["httpGet"];
        ensure!(g["host"] == Value::from("127.0.0.1") && g["port"] == Value::from(rmq_common::ADMIN_PORT) && g["path"] == Value::from(path), "{probe}: {g:?}");
    }
    let run = pod["volumes"].as_sequence().context("volumes")?.iter().find(|v| v["name"] == Value::from("run")).context("run volume")?;
    ensure!(run["hostPath"]["path"] == Value::from("/var/run/rmq-agent"), "admin and hand-off sockets must be on a hostPath shared by old and new pods");

    // The ConfigMap's agent.toml is what the agent really accepts, and its drain fits the grace period.
    let cm = yaml("configmap.yaml")?;
    let toml_text = cm["data"]["agent.toml"].as_str().context("agent.toml")?;
    let dir = std::env::temp_dir().join(format!("rmq-deploy-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("agent.toml");
    std::fs::write(&file, toml_text)?;
    let m = RunArgs::augment_args(Cli::new("run")).try_get_matches_from(["run", "--config", file.to_str().unwrap()])?;
    let cfg = RunArgs::resolve(&m).context("the ConfigMap's agent.toml is rejected by the agent")?;
    ensure!(cfg.admin_socket.to_str() == Some(rmq_common::ADMIN_SOCKET) && cfg.handoff_socket.to_str() == Some(rmq_common::HANDOFF_SOCKET));
    let grace = pod["terminationGracePeriodSeconds"].as_u64().context("terminationGracePeriodSeconds")?;
    ensure!(cfg.drain_timeout.as_secs() + 5 <= grace, "drain {:?} + 5 s must fit the {grace} s grace period", cfg.drain_timeout);

    // The image runs what the DaemonSet asks for.
    let docker = std::fs::read_to_string(repo_root().join("Dockerfile"))?;
    ensure!(docker.lines().filter(|l| l.starts_with("FROM ")).count() >= 2, "multi-stage Dockerfile");
    ensure!(docker.contains("--locked -p rmq-agent") && docker.contains("/usr/local/bin/rmq-agent"), "the image must build and ship rmq-agent");
    ensure!(docker.contains("iptables") && docker.contains("iproute2"), "the image needs the iptables and iproute2 tools");
    let args = c["args"].as_sequence().context("args")?;
    ensure!(args.iter().any(|a| a == &Value::from("/etc/rmq-agent/agent.toml")), "the agent must read the ConfigMap");
    Ok(())
}
