//! `rmq-cni`: run by the container runtime as a CNI plugin (CNI_COMMAND set), or by an
//! operator / the DaemonSet's installer container as `rmq-cni install|uninstall`.
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use serde_json::{Map, Value};

use rmq_cni::conf::PLUGIN_TYPE;
use rmq_cni::{install, plugin};

#[derive(Parser)]
#[command(name = "rmq-cni", version, about = "CNI chained plugin that captures pods' RocketMQ traffic for rmq-agent.\n\
Run by the container runtime when CNI_COMMAND is set (ADD, DEL, CHECK, VERSION).")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Copy the binary into the CNI bin dir and add our entry last to the primary conflist.
    Install(InstallArgs),
    /// Remove our conflist entry (restoring a converted .conf) and the binary.
    Uninstall(InstallArgs),
    /// Print the CNI spec versions this plugin supports.
    Version,
}

#[derive(Args)]
struct InstallArgs {
    #[arg(long, env = "RMQ_CNI_BIN_DIR", default_value = "/opt/cni/bin")]
    bin_dir: PathBuf,
    #[arg(long, env = "RMQ_CNI_CONF_DIR", default_value = "/etc/cni/net.d")]
    conf_dir: PathBuf,
    /// A specific file in --conf-dir (default: the one the runtime uses, first by name).
    #[arg(long, env = "RMQ_CNI_CONF_FILE")]
    conf_file: Option<String>,
    /// The binary to install (default: this one).
    #[arg(long)]
    source_bin: Option<PathBuf>,
    /// tproxy, redirect or auto (REDIRECT only for pods behind a bridge with br_netfilter).
    #[arg(long, env = "RMQ_CNI_CAPTURE_MODE", default_value = "auto")]
    capture_mode: String,
    #[arg(long, env = "RMQ_CNI_LOG_FILE")]
    log_file: Option<String>,
    /// Comma-separated namespaces whose pods are never captured (default: kube-system and the agent's).
    #[arg(long, env = "RMQ_CNI_EXCLUDE_NAMESPACES")]
    exclude_namespaces: Option<String>,
    #[arg(long, env = "RMQ_CNI_AGENT_NAMESPACE")]
    agent_namespace: Option<String>,
    /// Extra keys for the conflist entry, as a JSON object (e.g. '{"ports":[9876,10911]}').
    #[arg(long, env = "RMQ_CNI_ENTRY_JSON")]
    entry_json: Option<String>,
    /// Keep running and repair the entry whenever the primary CNI rewrites its file.
    #[arg(long)]
    watch: bool,
    #[arg(long, default_value_t = 1000)]
    interval_ms: u64,
}

impl InstallArgs {
    fn options(&self) -> anyhow::Result<install::Options> {
        let mut entry = Map::new();
        entry.insert("type".into(), PLUGIN_TYPE.into());
        entry.insert("captureMode".into(), self.capture_mode.clone().into());
        if let Some(f) = &self.log_file {
            entry.insert("logFile".into(), f.clone().into());
        }
        if let Some(list) = &self.exclude_namespaces {
            let v: Vec<Value> = list.split(',').map(str::trim).filter(|s| !s.is_empty()).map(|s| s.into()).collect();
            entry.insert("excludeNamespaces".into(), v.into());
        }
        if let Some(ns) = &self.agent_namespace {
            entry.insert("agentNamespace".into(), ns.clone().into());
        }
        if let Some(j) = &self.entry_json {
            let extra: Map<String, Value> = serde_json::from_str(j).context("--entry-json must be a JSON object")?;
            entry.extend(extra);
        }
        let source_bin = match &self.source_bin {
            Some(p) => p.clone(),
            None => std::env::current_exe().context("cannot find this binary; pass --source-bin")?,
        };
        Ok(install::Options {
            bin_dir: self.bin_dir.clone(),
            conf_dir: self.conf_dir.clone(),
            source_bin,
            entry,
            conf_file: self.conf_file.clone(),
        })
    }
}

fn say(msg: impl AsRef<str>) {
    eprintln!("rmq-cni: {}", msg.as_ref());
}

/// One line for what an install (or, with `removed`, an uninstall) pass changed.
fn describe(c: &install::Changes, removed: bool) -> String {
    let mut parts = Vec::new();
    if c.binary {
        parts.push(if removed { "binary removed" } else { "binary updated" }.to_string());
    }
    if let (Some(p), false) = (&c.converted_from, removed) {
        parts.push(format!("converted {}", p.display()));
    }
    if let Some(p) = &c.conflist {
        parts.push(if removed { format!("entry removed from {}", p.display()) } else { format!("wrote {}", p.display()) });
    }
    if let (Some(p), true) = (&c.converted_from, removed) {
        parts.push(format!("restored {}", p.display()));
    }
    match (parts.is_empty(), removed) {
        (false, _) => parts.join(", "),
        (true, false) => "already in place".into(),
        (true, true) => "nothing to remove".into(),
    }
}

fn main() -> anyhow::Result<()> {
    if std::env::var_os("CNI_COMMAND").is_some() {
        let out = plugin::run_from_env();
        print!("{}", out.stdout);
        std::process::exit(out.exit);
    }
    match Cli::parse().cmd {
        Cmd::Version => println!("{}", plugin::version_json()),
        Cmd::Install(a) => {
            let o = a.options()?;
            install::validate_entry(&o.entry)?;
            if a.watch {
                say(format!("watching {} every {} ms", o.conf_dir.display(), a.interval_ms));
                install::watch(&o, Duration::from_millis(a.interval_ms.max(50)), || false, |r| match r {
                    Ok(c) => say(format!("install: {}", describe(c, false))),
                    Err(e) => say(format!("install failed (will retry): {e}")),
                });
            } else {
                let c = install::install(&o)?;
                say(format!("install: {}", describe(&c, false)));
            }
        }
        Cmd::Uninstall(a) => {
            let c = install::uninstall(&a.options()?)?;
            say(format!("uninstall: {}", describe(&c, true)));
        }
    }
    Ok(())
}
