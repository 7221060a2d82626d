//! The deployment artifacts (`deploy/`, `Dockerfile`): manifests valid against the
//! Kubernetes schemas (kubernetes-validate, which bundles them), the DaemonSet properties
//! that hitless upgrades and least privilege depend on, a ConfigMap the agent itself
//! accepts, and a Dockerfile that ships what the DaemonSet runs.
//!
//! Needs no network. Like its siblings it runs in the sandbox (root, own netns), which also
//! keeps the agents started here off the machine's ports 15001/15020.
rmq_e2e::sandboxed_test_binary!();

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use clap::{Args, Command as Cli};
use rmq_agent::config::RunArgs;
use rmq_e2e::lab::repo_root;
use serde_yaml::Value;

const KUBERNETES_VERSIONS: [&str; 2] = ["1.25", "1.37"];
const CNI_INSTALL_ARGS: [&str; 6] = ["install", "--watch", "--bin-dir", "/host/opt/cni/bin", "--conf-dir", "/host/etc/cni/net.d"];
const CONFIG_PATH: &str = "/etc/rmq-agent/agent.toml";

fn deploy_dir() -> PathBuf {
    repo_root().join("deploy")
}

fn yaml(name: &str) -> Result<Value> {
    let path = deploy_dir().join(name);
    let text = std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    serde_yaml::from_str(&text).with_context(|| format!("parse {}", path.display()))
}

fn seq(v: &Value) -> &[Value] {
    v.as_sequence().map(|s| s.as_slice()).unwrap_or(&[])
}

fn strings(v: &Value) -> Vec<String> {
    seq(v).iter().filter_map(|s| s.as_str().map(str::to_string)).collect()
}

fn named<'a>(list: &'a Value, name: &str) -> Result<&'a Value> {
    seq(list).iter().find(|c| c["name"].as_str() == Some(name)).with_context(|| format!("no entry named {name:?}"))
}

fn pod_spec(ds: &Value) -> &Value {
    &ds["spec"]["template"]["spec"]
}

/// A `key = "value"` of the root Cargo.toml's `[workspace.package]`.
fn workspace_package(key: &str) -> Result<String> {
    let text = std::fs::read_to_string(repo_root().join("Cargo.toml"))?;
    let mut in_section = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_section = line == "[workspace.package]";
        } else if let Some((k, v)) = line.split_once('=').filter(|_| in_section) {
            if k.trim() == key {
                return Ok(v.trim().trim_matches('"').to_string());
            }
        }
    }
    bail!("Cargo.toml has no [workspace.package] {key}")
}

/// The ConfigMap's agent.toml, resolved exactly as `rmq-agent run --config` would.
fn configmap_config() -> Result<rmq_agent::config::Config> {
    let cm = yaml("configmap.yaml")?;
    let text = cm["data"]["agent.toml"].as_str().context("configmap.yaml has no data.agent.toml")?;
    let dir = scratch_dir("cm")?;
    let file = dir.join("agent.toml");
    std::fs::write(&file, text)?;
    let m = RunArgs::augment_args(Cli::new("run")).try_get_matches_from(["run", "--config", file.to_str().unwrap()])?;
    let cfg = RunArgs::resolve(&m).context("the agent rejects the ConfigMap's agent.toml");
    let _ = std::fs::remove_dir_all(&dir);
    cfg
}

fn scratch_dir(tag: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("rmq-deploy-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn output_text(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

// ---------------------------------------------------------------- schema validation

#[test]
fn manifests_validate_against_kubernetes_schemas() -> Result<()> {
    let out = Command::new(repo_root().join("scripts/validate-manifests.sh"))
        .output()
        .context("run scripts/validate-manifests.sh")?;
    let text = output_text(&out);
    ensure!(out.status.success(), "manifest validation failed ({}):\n{text}", out.status);
    let files = kustomize_resources()?;
    ensure!(files.len() == 4, "expected 4 manifests, kustomization.yaml lists {files:?}");
    for file in &files {
        for v in KUBERNETES_VERSIONS {
            let passed = text.lines().any(|l| l.contains(&format!("{file} passed for resource ")) && l.ends_with(&format!("against version {v}")));
            ensure!(passed, "{file} was not validated against Kubernetes {v}:\n{text}");
        }
    }
    ensure!(!text.contains("did not validate") && !text.contains("WARN"), "validation printed errors or warnings:\n{text}");
    Ok(())
}

/// The validator is strict: a misspelt field (silently ignored by a lenient apply) fails.
#[test]
fn validation_rejects_an_unknown_field() -> Result<()> {
    let dir = scratch_dir("strict")?;
    std::fs::create_dir_all(dir.join("scripts"))?;
    std::fs::create_dir_all(dir.join("deploy"))?;
    std::fs::copy(repo_root().join("scripts/validate-manifests.sh"), dir.join("scripts/validate-manifests.sh"))?;
    for entry in std::fs::read_dir(deploy_dir())? {
        let entry = entry?;
        std::fs::copy(entry.path(), dir.join("deploy").join(entry.file_name()))?;
    }
    let ds = dir.join("deploy/daemonset.yaml");
    let text = std::fs::read_to_string(&ds)?;
    let broken = text.replacen("      hostNetwork: true\n", "      hostNetwork: true\n      hostNetwrok: true\n", 1);
    ensure!(broken != text, "daemonset.yaml has no `hostNetwork: true` line at pod-spec indentation");
    std::fs::write(&ds, broken)?;
    let out = Command::new(dir.join("scripts/validate-manifests.sh")).env("K8S_VERSIONS", "1.37.0").output()?;
    let text = output_text(&out);
    ensure!(!out.status.success(), "a DaemonSet with an unknown field passed validation:\n{text}");
    ensure!(text.contains("daemonset.yaml did not validate") && text.contains("hostNetwrok"), "unexpected failure:\n{text}");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn kustomize_resources() -> Result<Vec<String>> {
    Ok(strings(&yaml("kustomization.yaml")?["resources"]))
}

#[test]
fn kustomization_applies_every_manifest_and_grants_no_api_access() -> Result<()> {
    let listed: BTreeSet<String> = kustomize_resources()?.into_iter().collect();
    let mut on_disk = BTreeSet::new();
    for entry in std::fs::read_dir(deploy_dir())? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if name.ends_with(".yaml") && name != "kustomization.yaml" {
            on_disk.insert(name);
        }
    }
    ensure!(listed == on_disk, "kustomization.yaml lists {listed:?}, deploy/ holds {on_disk:?}");

    let mut kinds = BTreeSet::new();
    for file in &listed {
        let doc = yaml(file)?;
        let kind = doc["kind"].as_str().with_context(|| format!("{file}: no kind"))?.to_string();
        ensure!(!kind.contains("Role"), "{file}: {kind}: the agent needs no Kubernetes API access");
        if kind != "Namespace" {
            ensure!(doc["metadata"]["namespace"].as_str() == Some("rmq-system"), "{file}: not in rmq-system");
        }
        kinds.insert(kind);
    }
    let want: BTreeSet<String> = ["Namespace", "ServiceAccount", "ConfigMap", "DaemonSet"].map(String::from).into();
    ensure!(kinds == want, "kinds {kinds:?}");
    ensure!(yaml("namespace.yaml")?["metadata"]["name"].as_str() == Some("rmq-system"));
    let sa = yaml("serviceaccount.yaml")?;
    ensure!(sa["automountServiceAccountToken"] == Value::Bool(false), "the ServiceAccount must not mount a token");
    let ds = yaml("daemonset.yaml")?;
    ensure!(pod_spec(&ds)["serviceAccountName"] == sa["metadata"]["name"], "the DaemonSet must use the rmq-agent ServiceAccount");
    ensure!(pod_spec(&ds)["automountServiceAccountToken"] == Value::Bool(false), "the pod must not mount a token");
    Ok(())
}

// ---------------------------------------------------------------- DaemonSet properties

#[test]
fn daemonset_is_built_for_hitless_upgrades_and_least_privilege() -> Result<()> {
    let ds = yaml("daemonset.yaml")?;
    let spec = &ds["spec"];
    let pod = pod_spec(&ds);
    ensure!(spec["selector"]["matchLabels"]["app.kubernetes.io/name"] == ds["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"]);

    ensure!(pod["hostNetwork"] == Value::Bool(true), "needs hostNetwork: rules and the listener live in the node netns");
    ensure!(pod["dnsPolicy"].as_str() == Some("ClusterFirstWithHostNet"), "dnsPolicy: {:?}", pod["dnsPolicy"]);
    ensure!(pod["priorityClassName"].as_str() == Some("system-node-critical"));
    let tolerations = seq(&pod["tolerations"]);
    ensure!(
        tolerations.iter().any(|t| t["operator"].as_str() == Some("Exists") && t["key"].is_null() && t["effect"].is_null()),
        "must tolerate every taint: {tolerations:?}"
    );
    ensure!(spec["updateStrategy"]["type"].as_str() == Some("RollingUpdate"));
    let ru = &spec["updateStrategy"]["rollingUpdate"];
    ensure!(ru["maxSurge"].as_u64() == Some(1) && ru["maxUnavailable"].as_u64() == Some(0), "upgrades must surge: {ru:?}");

    let cfg = configmap_config()?;
    let grace = pod["terminationGracePeriodSeconds"].as_u64().context("terminationGracePeriodSeconds")?;
    ensure!(
        cfg.drain_timeout + Duration::from_secs(10) <= Duration::from_secs(grace),
        "drain-timeout-ms {:?} + 10 s (receipt release and pending acks) must fit terminationGracePeriodSeconds {grace}",
        cfg.drain_timeout
    );

    let containers = seq(&pod["containers"]);
    let names: Vec<_> = containers.iter().filter_map(|c| c["name"].as_str()).collect();
    ensure!(names == ["agent", "cni-install"], "containers: {names:?}");
    ensure!(seq(&pod["initContainers"]).is_empty(), "the installer runs next to the agent (it watches)");
    let agent = named(&pod["containers"], "agent")?;
    let installer = named(&pod["containers"], "cni-install")?;

    // Capabilities: the agent exactly NET_ADMIN + NET_RAW, the installer none; nobody privileged.
    for (c, want) in [(agent, vec!["NET_ADMIN", "NET_RAW"]), (installer, vec![])] {
        let sc = &c["securityContext"];
        let name = c["name"].as_str().unwrap_or("?");
        ensure!(strings(&sc["capabilities"]["drop"]) == ["ALL"], "{name}: must drop ALL capabilities: {sc:?}");
        let mut add = strings(&sc["capabilities"]["add"]);
        add.sort();
        ensure!(add == want, "{name}: capabilities added {add:?}, want {want:?}");
        ensure!(sc["privileged"] != Value::Bool(true), "{name}: privileged");
        ensure!(sc["allowPrivilegeEscalation"] == Value::Bool(false), "{name}: allowPrivilegeEscalation must be false");
        ensure!(sc["readOnlyRootFilesystem"] == Value::Bool(true), "{name}: readOnlyRootFilesystem");
        ensure!(c["image"] == agent["image"], "{name}: both containers run the one image");
        for r in ["cpu", "memory"] {
            ensure!(c["resources"]["requests"][r].is_string(), "{name}: no {r} request");
        }
        ensure!(c["resources"]["limits"]["memory"].is_string(), "{name}: no memory limit");
    }
    ensure!(pod["securityContext"]["seccompProfile"]["type"].as_str() == Some("RuntimeDefault"));
    for key in ["hostPID", "hostIPC"] {
        ensure!(pod[key] != Value::Bool(true), "{key} is not needed");
    }

    // Probes: the agent's loopback admin port, from the kubelet in the node netns.
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let g = &agent[probe]["httpGet"];
        ensure!(
            g["host"].as_str() == Some("127.0.0.1") && g["port"].as_u64() == Some(u64::from(rmq_common::ADMIN_PORT)) && g["path"].as_str() == Some(path),
            "{probe}: {g:?}"
        );
    }
    ensure!(cfg.admin_addr.to_string() == format!("127.0.0.1:{}", rmq_common::ADMIN_PORT), "probes and admin-addr disagree: {}", cfg.admin_addr);
    let ann = &ds["spec"]["template"]["metadata"]["annotations"];
    ensure!(ann["prometheus.io/scrape"].as_str() == Some("true"));
    ensure!(ann["prometheus.io/port"].as_str() == Some(rmq_common::ADMIN_PORT.to_string().as_str()));
    ensure!(ann["prometheus.io/path"].as_str() == Some("/metrics"));

    // The agent reads the ConfigMap; the installer runs the plugin's CLI with exactly these flags.
    ensure!(strings(&agent["args"]) == ["run", "--config", CONFIG_PATH], "agent args: {:?}", agent["args"]);
    ensure!(strings(&installer["command"]) == ["/usr/local/bin/rmq-cni"], "installer command: {:?}", installer["command"]);
    ensure!(strings(&installer["args"]) == CNI_INSTALL_ARGS, "installer args: {:?}", installer["args"]);

    // Volumes: the sockets' and the CNI's host directories, mounted where the flags point.
    let host_path = |name: &str| -> Result<(String, String)> {
        let v = named(&pod["volumes"], name)?;
        Ok((v["hostPath"]["path"].as_str().unwrap_or("").to_string(), v["hostPath"]["type"].as_str().unwrap_or("").to_string()))
    };
    let mount = |c: &Value, name: &str| -> Result<String> {
        Ok(named(&c["volumeMounts"], name)?["mountPath"].as_str().unwrap_or("").to_string())
    };
    let sock_dir = Path::new(rmq_common::ADMIN_SOCKET).parent().unwrap().to_str().unwrap().to_string();
    ensure!(Path::new(rmq_common::HANDOFF_SOCKET).parent() == Path::new(rmq_common::ADMIN_SOCKET).parent());
    ensure!(host_path("run")? == (sock_dir.clone(), "DirectoryOrCreate".into()), "the socket dir must be a hostPath shared by old and new pods");
    ensure!(mount(agent, "run")? == sock_dir);
    ensure!(cfg.admin_socket.to_str() == Some(rmq_common::ADMIN_SOCKET) && cfg.handoff_socket.to_str() == Some(rmq_common::HANDOFF_SOCKET));
    ensure!(host_path("cni-bin")?.0 == "/opt/cni/bin" && mount(installer, "cni-bin")? == "/host/opt/cni/bin");
    ensure!(host_path("cni-conf")?.0 == "/etc/cni/net.d" && mount(installer, "cni-conf")? == "/host/etc/cni/net.d");
    let config = named(&pod["volumes"], "config")?;
    ensure!(config["configMap"]["name"] == yaml("configmap.yaml")?["metadata"]["name"]);
    ensure!(Path::new(&mount(agent, "config")?).join("agent.toml") == Path::new(CONFIG_PATH));
    // Only the installer writes to the node's CNI directories; the agent does not see them.
    ensure!(named(&agent["volumeMounts"], "cni-bin").is_err() && named(&agent["volumeMounts"], "cni-conf").is_err());
    Ok(())
}

#[test]
fn configmap_is_what_the_agent_accepts() -> Result<()> {
    let cfg = configmap_config()?;
    ensure!(cfg.ports == rmq_common::DEFAULT_ROCKETMQ_PORTS, "ports {:?}", cfg.ports);
    ensure!(cfg.drain_timeout == Duration::from_millis(25_000), "drain {:?}", cfg.drain_timeout);
    ensure!(format!("{:?}", cfg.log_format).eq_ignore_ascii_case("json"), "log format {:?}", cfg.log_format);
    ensure!(format!("{:?}", cfg.capture).eq_ignore_ascii_case("auto"), "capture {:?}", cfg.capture);
    ensure!(cfg.admin_addr.ip().is_loopback());
    // A kubelet restarts an exited container; after a hand-over the old agent must idle
    // (tests/upgrade.rs proves the behaviour) or it would take the listener back.
    ensure!(cfg.idle_after_handover, "idle-after-handover must be on under a DaemonSet");
    Ok(())
}

// ---------------------------------------------------------------- Dockerfile

struct Stage {
    image: String,
    alias: Option<String>,
    /// (instruction, arguments), continuation lines joined, comments dropped.
    steps: Vec<(String, String)>,
}

fn dockerfile_stages() -> Result<Vec<Stage>> {
    let text = std::fs::read_to_string(repo_root().join("Dockerfile"))?;
    let mut logical = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && cur.is_empty()) {
            continue;
        }
        match t.strip_suffix('\\') {
            Some(head) => {
                cur.push_str(head);
                cur.push(' ');
            }
            None => {
                cur.push_str(t);
                logical.push(std::mem::take(&mut cur));
            }
        }
    }
    ensure!(cur.is_empty(), "Dockerfile ends inside a continued line");
    let mut stages: Vec<Stage> = Vec::new();
    for l in logical {
        let (inst, rest) = l.split_once(char::is_whitespace).unwrap_or((l.as_str(), ""));
        let (inst, rest) = (inst.to_ascii_uppercase(), rest.trim().to_string());
        if inst == "FROM" {
            let words: Vec<&str> = rest.split_whitespace().collect();
            ensure!(!words[0].starts_with("--"), "FROM --platform is not used: {rest}");
            let alias = match words.as_slice() {
                [_, a, name] if a.eq_ignore_ascii_case("as") => Some(name.to_string()),
                [_] => None,
                _ => bail!("unexpected FROM {rest}"),
            };
            stages.push(Stage { image: words[0].to_string(), alias, steps: vec![] });
        } else {
            stages.last_mut().context("instruction before FROM")?.steps.push((inst, rest));
        }
    }
    Ok(stages)
}

fn version_tuple(v: &str) -> Vec<u32> {
    v.split('.').map(|p| p.parse().unwrap_or(0)).collect()
}

#[test]
fn dockerfile_builds_and_ships_what_the_daemonset_runs() -> Result<()> {
    let stages = dockerfile_stages()?;
    ensure!(stages.len() >= 2, "multi-stage Dockerfile expected, got {} stage(s)", stages.len());
    let build = &stages[0];
    let runtime = stages.last().unwrap();

    for s in &stages {
        let (name, tag) = s.image.split_once(':').with_context(|| format!("{} is not pinned by tag", s.image))?;
        ensure!(!tag.is_empty() && tag != "latest" && !name.contains('$'), "{} must be pinned by a fixed tag", s.image);
        for (inst, args) in &s.steps {
            ensure!(inst != "ADD", "ADD can fetch URLs; use COPY: ADD {args}");
            for fetch in ["curl ", "wget ", "rustup ", "git clone"] {
                ensure!(!args.contains(fetch), "network fetch beyond apt/cargo: {inst} {args}");
            }
        }
    }

    // Builder: the official Rust image, at least the workspace's rust-version, same Debian as the runtime.
    let (name, tag) = build.image.split_once(':').unwrap();
    ensure!(name == "rust", "builder must be the official Rust image: {}", build.image);
    let msrv = workspace_package("rust-version")?;
    let rust = tag.split('-').next().unwrap();
    ensure!(version_tuple(rust) >= version_tuple(&msrv), "builder Rust {rust} is older than rust-version {msrv}");
    ensure!(tag.ends_with("-bookworm") && runtime.image == "debian:bookworm-slim", "builder {} and runtime {} must be the same Debian release", build.image, runtime.image);
    let alias = build.alias.as_deref().context("the build stage needs a name for COPY --from")?;
    ensure!(
        build.steps.iter().any(|(i, a)| i == "RUN" && a.contains("cargo build --release --locked -p rmq-agent -p rmq-cni")),
        "the builder must run `cargo build --release --locked -p rmq-agent -p rmq-cni`"
    );

    // Runtime: the iptables (nft and legacy, v4 and v6) and iproute2 tools, apt leftovers removed.
    let runs: Vec<&str> = runtime.steps.iter().filter(|(i, _)| i == "RUN").map(|(_, a)| a.as_str()).collect();
    let apt = runs.iter().find(|r| r.contains("apt-get install")).context("runtime installs no packages")?;
    ensure!(apt.contains("--no-install-recommends"), "apt-get install without --no-install-recommends");
    let words: BTreeSet<&str> = apt.split_whitespace().collect();
    for pkg in ["iptables", "iproute2"] {
        ensure!(words.contains(pkg), "runtime image lacks {pkg}");
    }
    for tool in ["iptables-nft", "ip6tables-nft", "iptables-legacy", "ip6tables-legacy", "ip -V"] {
        ensure!(apt.contains(tool), "the image build does not check {tool}");
    }
    ensure!(apt.contains("rm -rf /var/lib/apt/lists/*"), "apt lists left in the image");
    ensure!(apt.contains("/usr/share/doc") && apt.contains("/usr/share/man"), "docs and man pages left in the image");

    // Both binaries, from the builder, where the DaemonSet calls them.
    for bin in ["rmq-agent", "rmq-cni"] {
        let dest = format!("/usr/local/bin/{bin}");
        let copied = runtime.steps.iter().any(|(i, a)| {
            i == "COPY" && a.starts_with(&format!("--from={alias} ")) && a.split_whitespace().last() == Some(dest.as_str()) && a.contains(bin)
        });
        ensure!(copied, "the runtime stage must COPY --from={alias} {bin} to {dest}");
    }
    let entrypoint = runtime.steps.iter().rev().find(|(i, _)| i == "ENTRYPOINT").context("no ENTRYPOINT")?;
    let entrypoint: Vec<String> = serde_json::from_str(&entrypoint.1).context("ENTRYPOINT must be exec form")?;
    ensure!(entrypoint == ["/usr/local/bin/rmq-agent"], "ENTRYPOINT {entrypoint:?}");
    // Root, with the capabilities cut down by the pod spec: no USER switch (see the Dockerfile's note).
    ensure!(stages.iter().all(|s| s.steps.iter().all(|(i, _)| i != "USER")), "the agent needs root with NET_ADMIN/NET_RAW; no USER");
    let raw = std::fs::read_to_string(repo_root().join("Dockerfile"))?;
    ensure!(raw.contains("NET_ADMIN") && raw.contains("NET_RAW"), "the Dockerfile must say why it runs as root");

    let ignore = std::fs::read_to_string(repo_root().join(".dockerignore"))?;
    let ignored: BTreeSet<&str> = ignore.lines().map(|l| l.trim().trim_end_matches('/')).collect();
    ensure!(ignored.contains("target") && ignored.contains(".git"), ".dockerignore must leave out target/ and .git/");
    for needed in ["Cargo.toml", "Cargo.lock", "agent", "common", "cni", "tests", "bench"] {
        ensure!(!ignored.contains(needed), ".dockerignore drops {needed}, which the workspace build needs");
    }

    // The DaemonSet runs this image's binaries, tagged with the workspace version.
    let ds = yaml("daemonset.yaml")?;
    let pod = pod_spec(&ds);
    let version = workspace_package("version")?;
    for c in seq(&pod["containers"]) {
        ensure!(c["image"].as_str() == Some(format!("rmq-agent:{version}").as_str()), "image {:?}, workspace version {version}", c["image"]);
    }
    let agent = named(&pod["containers"], "agent")?;
    ensure!(agent["command"].is_null(), "the agent runs as the image's ENTRYPOINT, not {:?}", agent["command"]);
    Ok(())
}
