//! Configuration: flags, then environment (`RMQ_AGENT_*`), then an optional
//! TOML file (`--config`), then defaults. Validated once at start-up.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::parser::ValueSource;
use clap::{ArgMatches, Args, FromArgMatches};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::socket::CaptureMode;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// `rmq-agent run` flags. Every flag also reads an env var; a file value
/// applies only where neither was given.
#[derive(Debug, Clone, Args, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RunArgs {
    /// Capture listener address (dual-stack when `[::]`).
    #[arg(long, env = "RMQ_AGENT_LISTEN", default_value = "[::]:15001")]
    pub listen: SocketAddr,
    /// How pods' traffic is captured, which decides how the original destination is recovered.
    #[arg(long, env = "RMQ_AGENT_CAPTURE", value_enum, default_value = "auto")]
    pub capture: CaptureMode,
    /// Connect upstream from the pod's own IP (IP_TRANSPARENT), so brokers see the pod.
    #[arg(long, env = "RMQ_AGENT_SPOOF_SOURCE")]
    #[serde(default)]
    pub spoof_source: bool,
    /// Destination ports the agent will proxy (RocketMQ name server and broker ports).
    #[arg(long, env = "RMQ_AGENT_PORTS", value_delimiter = ',', default_value = "9876,10911,10909")]
    pub ports: Vec<u16>,
    /// Destination CIDRs the agent will proxy to (repeat or comma-separate).
    #[arg(long, env = "RMQ_AGENT_ALLOW_CIDRS", value_delimiter = ',', default_value = "0.0.0.0/0,::/0")]
    pub allow_cidr: Vec<IpNet>,
    /// Largest RocketMQ frame accepted, in bytes (RocketMQ's own default is 16 MiB).
    #[arg(long, env = "RMQ_AGENT_MAX_FRAME", default_value_t = rmq_common::DEFAULT_MAX_FRAME)]
    pub max_frame: usize,
    /// Upstream connect timeout.
    #[arg(long, env = "RMQ_AGENT_CONNECT_TIMEOUT_MS", default_value_t = 5000)]
    pub connect_timeout_ms: u64,
    /// Metrics and health endpoint; must be a loopback address.
    #[arg(long, env = "RMQ_AGENT_ADMIN_ADDR", default_value = "127.0.0.1:15020")]
    pub admin_addr: SocketAddr,
    /// Admin unix socket (state dump, log level); root-only permissions.
    #[arg(long, env = "RMQ_AGENT_ADMIN_SOCKET", default_value = rmq_common::ADMIN_SOCKET)]
    pub admin_socket: PathBuf,
    /// Unix socket where a running agent hands its listener and connections to a successor.
    #[arg(long, env = "RMQ_AGENT_HANDOFF_SOCKET", default_value = rmq_common::HANDOFF_SOCKET)]
    pub handoff_socket: PathBuf,
    /// Pull→Pop conversion: `none`, `all`, or a comma list of consumer groups.
    #[arg(long, env = "RMQ_AGENT_CONVERT", default_value = "none")]
    pub convert: String,
    /// How long a popped message stays invisible (renewed while its client holds it).
    #[arg(long, env = "RMQ_AGENT_POP_INVISIBLE_MS", default_value_t = 60_000)]
    pub pop_invisible_ms: u64,
    /// Invisible time for messages the agent releases (never delivered, or the client left).
    #[arg(long, env = "RMQ_AGENT_POP_RELEASE_MS", default_value_t = 1_000)]
    pub pop_release_ms: u64,
    /// Redeliveries of a converted group's message before it goes to %DLQ% (0 = what the SDK asks, default 16).
    #[arg(long, env = "RMQ_AGENT_POP_MAX_RECONSUME", default_value_t = 0)]
    pub pop_max_reconsume: i32,
    /// Fixed delay before a sent-back message comes again (0 = the broker's delay levels).
    #[arg(long, env = "RMQ_AGENT_POP_RETRY_DELAY_MS", default_value_t = 0)]
    pub pop_retry_delay_ms: u64,
    /// Route Pop-native clients' ACK / BATCH_ACK / CHANGE_INVISIBLETIME to the broker that served
    /// the pop, when they arrive on a connection to another broker (`on` or `off`).
    #[arg(long, env = "RMQ_AGENT_POP_ACK_ROUTING", default_value = "on", value_parser = parse_on_off, action = clap::ArgAction::Set)]
    #[serde(deserialize_with = "de_on_off", default = "default_on")]
    pub pop_ack_routing: bool,
    /// Name servers whose reachability gates /readyz (empty: ready once listening).
    #[arg(long, env = "RMQ_AGENT_READY_NAMESRV", value_delimiter = ',')]
    #[serde(default)]
    pub ready_namesrv: Vec<SocketAddr>,
    #[arg(long, env = "RMQ_AGENT_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Log one line per relayed request (`on`) or not (`off`).
    #[arg(long, env = "RMQ_AGENT_ACCESS_LOG", default_value = "on", value_parser = parse_on_off, action = clap::ArgAction::Set)]
    #[serde(deserialize_with = "de_on_off")]
    pub access_log: bool,
    /// Data-plane worker threads (0 = one per CPU).
    #[arg(long, env = "RMQ_AGENT_WORKERS", default_value_t = 0)]
    pub workers: usize,
    /// How long SIGTERM waits for open connections to finish.
    #[arg(long, env = "RMQ_AGENT_DRAIN_TIMEOUT_MS", default_value_t = 5000)]
    pub drain_timeout_ms: u64,
    /// After handing over to a newer agent, stay alive (idle, no sockets) until SIGTERM
    /// instead of exiting; for DaemonSets, whose kubelet would restart an exited
    /// container and take the listener back. Exits non-zero if the successor vanishes.
    #[arg(long, env = "RMQ_AGENT_IDLE_AFTER_HANDOVER")]
    #[serde(default)]
    pub idle_after_handover: bool,
    /// TOML file with the same keys as the flags (kebab-case).
    #[arg(long, env = "RMQ_AGENT_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
}

fn default_on() -> bool {
    true
}

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" | "true" | "1" => Ok(true),
        "off" | "false" | "0" => Ok(false),
        _ => Err(format!("expected on or off, got {s:?}")),
    }
}

/// A file may say `access-log = "off"` like the flag, or `access-log = false`.
fn de_on_off<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OnOff {
        Bool(bool),
        Word(String),
    }
    match OnOff::deserialize(d)? {
        OnOff::Bool(b) => Ok(b),
        OnOff::Word(w) => parse_on_off(&w).map_err(serde::de::Error::custom),
    }
}

/// The validated configuration the agent runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub capture: CaptureMode,
    pub spoof_source: bool,
    pub ports: Vec<u16>,
    pub allow_cidrs: Vec<IpNet>,
    pub max_frame: usize,
    pub connect_timeout: Duration,
    pub admin_addr: SocketAddr,
    pub admin_socket: PathBuf,
    pub handoff_socket: PathBuf,
    pub ready_namesrv: Vec<SocketAddr>,
    pub convert: crate::convert::ConvertConfig,
    pub log_format: LogFormat,
    pub access_log: bool,
    pub workers: usize,
    pub drain_timeout: Duration,
    pub idle_after_handover: bool,
}

impl RunArgs {
    /// Builds `RunArgs` from parsed matches, filling values that came from
    /// clap defaults with the config file's values.
    pub fn resolve(matches: &ArgMatches) -> anyhow::Result<Config> {
        let mut args = RunArgs::from_arg_matches(matches)?;
        if let Some(path) = args.config.clone() {
            let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read config file {}", path.display()))?;
            let file: toml::Table = toml::from_str(&text).with_context(|| format!("config file {} is not valid TOML", path.display()))?;
            // A file value wins only over a clap default; unknown keys are
            // kept so that deserialising rejects them by name.
            let mut merged = toml::Table::try_from(&args).context("internal: cannot serialise flags")?;
            for (k, v) in file {
                let id = k.replace('-', "_");
                if !merged.contains_key(&k) || matches.value_source(&id) == Some(ValueSource::DefaultValue) {
                    merged.insert(k, v);
                }
            }
            let config = args.config.take();
            args = merged.try_into().with_context(|| format!("config file {} has an unknown key or a bad value", path.display()))?;
            args.config = config;
        }
        args.validate()
    }

    fn validate(self) -> anyhow::Result<Config> {
        if !self.admin_addr.ip().is_loopback() {
            bail!("--admin-addr {} is not a loopback address; the admin endpoint must only be reachable from the node", self.admin_addr);
        }
        if self.ports.is_empty() {
            bail!("--ports is empty; give the RocketMQ ports to proxy, e.g. 9876,10911,10909");
        }
        if self.ports.contains(&self.listen.port()) {
            bail!("--ports contains the agent's own port {}; that would make it relay to itself", self.listen.port());
        }
        if self.pop_invisible_ms < 2 * 10_000 {
            bail!("--pop-invisible-ms must be at least 20000: receipts are renewed 10 s before they expire");
        }
        if self.max_frame < 8 || self.max_frame > i32::MAX as usize {
            bail!("--max-frame must be between 8 and {} bytes", i32::MAX);
        }
        Ok(Config {
            listen: self.listen,
            capture: self.capture,
            spoof_source: self.spoof_source,
            ports: self.ports,
            allow_cidrs: self.allow_cidr,
            max_frame: self.max_frame,
            connect_timeout: Duration::from_millis(self.connect_timeout_ms),
            admin_addr: self.admin_addr,
            admin_socket: self.admin_socket,
            handoff_socket: self.handoff_socket,
            convert: crate::convert::ConvertConfig {
                policy: self.convert.parse().map_err(|e| anyhow::anyhow!("--convert {:?}: {e}", self.convert))?,
                invisible: Duration::from_millis(self.pop_invisible_ms),
                release: Duration::from_millis(self.pop_release_ms),
                max_reconsume: (self.pop_max_reconsume > 0).then_some(self.pop_max_reconsume),
                retry_delay: (self.pop_retry_delay_ms > 0).then(|| Duration::from_millis(self.pop_retry_delay_ms)),
                ack_routing: self.pop_ack_routing,
            },
            ready_namesrv: self.ready_namesrv,
            log_format: self.log_format,
            access_log: self.access_log,
            workers: self.workers,
            drain_timeout: Duration::from_millis(self.drain_timeout_ms),
            idle_after_handover: self.idle_after_handover,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Args, Command};

    fn resolve(argv: &[&str]) -> anyhow::Result<Config> {
        let cmd = RunArgs::augment_args(Command::new("run"));
        let m = cmd.try_get_matches_from(std::iter::once("run").chain(argv.iter().copied()))?;
        RunArgs::resolve(&m)
    }

    #[test]
    fn defaults_are_the_shared_constants() {
        let c = resolve(&[]).unwrap();
        assert_eq!(c.listen.port(), rmq_common::AGENT_PORT);
        assert_eq!(c.ports, rmq_common::DEFAULT_ROCKETMQ_PORTS.to_vec());
        assert_eq!(c.admin_addr.port(), rmq_common::ADMIN_PORT);
    }

    #[test]
    fn file_fills_defaults_but_flags_win() {
        let dir = std::env::temp_dir().join(format!("rmq-agent-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("agent.toml");
        std::fs::write(&f, "capture = \"redirect\"\nports = [9876]\nmax-frame = 1024\n").unwrap();
        let c = resolve(&["--config", f.to_str().unwrap(), "--max-frame", "2048"]).unwrap();
        assert_eq!(c.capture, CaptureMode::Redirect);
        assert_eq!(c.ports, vec![9876]);
        assert_eq!(c.max_frame, 2048);
        std::fs::write(&f, "no-such-key = 1\n").unwrap();
        let e = resolve(&["--config", f.to_str().unwrap()]).unwrap_err();
        assert!(format!("{e:#}").contains("no-such-key"), "{e:#}");
    }

    #[test]
    fn access_log_takes_on_or_off() {
        assert!(resolve(&[]).unwrap().access_log);
        assert!(!resolve(&["--access-log", "off"]).unwrap().access_log);
        assert!(resolve(&["--access-log", "maybe"]).is_err());
        // The file takes the flag's words or a TOML bool.
        let dir = std::env::temp_dir().join(format!("rmq-agent-cfg-al-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("agent.toml");
        for (text, want) in [("access-log = \"off\"\n", false), ("access-log = false\n", false), ("access-log = \"on\"\n", true)] {
            std::fs::write(&f, text).unwrap();
            assert_eq!(resolve(&["--config", f.to_str().unwrap()]).unwrap().access_log, want, "{text}");
        }
        std::fs::write(&f, "access-log = \"loud\"\n").unwrap();
        assert!(resolve(&["--config", f.to_str().unwrap()]).is_err());
    }

    #[test]
    fn pop_ack_routing_is_on_unless_turned_off() {
        assert!(resolve(&[]).unwrap().convert.ack_routing);
        assert!(!resolve(&["--pop-ack-routing", "off"]).unwrap().convert.ack_routing);
        let dir = std::env::temp_dir().join(format!("rmq-agent-cfg-ar-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("agent.toml");
        std::fs::write(&f, "pop-ack-routing = \"off\"\n").unwrap();
        assert!(!resolve(&["--config", f.to_str().unwrap()]).unwrap().convert.ack_routing);
    }

    #[test]
    fn rejects_unsafe_settings() {
        assert!(resolve(&["--admin-addr", "0.0.0.0:15020"]).is_err());
        assert!(resolve(&["--ports", "9876,15001"]).is_err());
    }
}
