//! `rmq-agent status`: what the node agent is doing, read from its admin
//! socket (or a saved dump), as a table, JSON or YAML.
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};

use crate::state::{ConnectionView, StateDump};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
    Yaml,
}

#[derive(Debug, Clone, clap::Args)]
pub struct StatusArgs {
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    pub output: Output,
    /// Only connections from this pod IP.
    #[arg(long)]
    pub pod: Option<String>,
    /// Only connections whose SDK used this consumer or producer group.
    #[arg(long)]
    pub group: Option<String>,
    /// Read a saved dump (`rmq-agent status -o json > dump.json`) instead of the live agent.
    #[arg(short = 'f', long)]
    pub file: Option<PathBuf>,
    /// The agent's admin socket.
    #[arg(long, env = "RMQ_AGENT_ADMIN_SOCKET", default_value = rmq_common::ADMIN_SOCKET)]
    pub socket: PathBuf,
}

pub fn run(args: StatusArgs) -> anyhow::Result<()> {
    let mut dump: StateDump = match &args.file {
        Some(f) => {
            let text = std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?;
            serde_json::from_str(&text).or_else(|_| serde_yaml::from_str(&text)).with_context(|| format!("{} is not a JSON or YAML state dump", f.display()))?
        }
        None => fetch(&args.socket)?,
    };
    dump.connections.retain(|c| keep(c, &args));
    let out = match args.output {
        Output::Json => serde_json::to_string_pretty(&dump)? + "\n",
        Output::Yaml => serde_yaml::to_string(&dump)?,
        Output::Table => table(&dump),
    };
    std::io::stdout().write_all(out.as_bytes())?;
    Ok(())
}

fn keep(c: &ConnectionView, args: &StatusArgs) -> bool {
    let pod_ok = args.pod.as_ref().is_none_or(|p| pod_ip(&c.pod) == p.trim_matches(['[', ']']));
    let group_ok = args.group.as_ref().is_none_or(|g| c.groups.iter().any(|x| x == g));
    pod_ok && group_ok
}

fn pod_ip(pod: &str) -> &str {
    // "10.0.0.1:1234" or "[fd00::1]:1234"
    pod.rsplit_once(':').map(|(ip, _)| ip).unwrap_or(pod).trim_matches(['[', ']'])
}

/// One HTTP GET over the admin socket.
pub fn fetch(socket: &Path) -> anyhow::Result<StateDump> {
    let mut s = match UnixStream::connect(socket) {
        Ok(s) => s,
        Err(e) => bail!(
            "no rmq-agent is running on this node (cannot connect to {}: {e}). Start it with `rmq-agent run`, \
             or pass --socket if it uses another admin socket",
            socket.display()
        ),
    };
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET /state HTTP/1.0\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).context("the agent did not answer on its admin socket")?;
    let (head, body) = resp.split_once("\r\n\r\n").context("malformed answer from the admin socket")?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("the agent answered: {}", head.lines().next().unwrap_or(head));
    }
    serde_json::from_str(body).context("the agent's state dump is not valid JSON (version mismatch between agent and CLI?)")
}

fn table(d: &StateDump) -> String {
    let mut o = String::new();
    let up = d.now_unix_ms.saturating_sub(d.started_unix_ms) / 1000;
    let state = if d.draining { "draining" } else if d.ready { "ready" } else { "not ready" };
    o += &format!("rmq-agent {} pid {} generation {}  {}  up {}\n", d.version, d.pid, d.generation, state, human_secs(up));
    for l in &d.listeners {
        o += &format!("listener  {}  capture={}  transparent={}{}\n", l.addr, l.capture, l.transparent, if l.inherited { "  (inherited)" } else { "" });
    }
    o += &format!("\n{} proxied connection(s)\n", d.connections.len());
    if !d.connections.is_empty() {
        let rows: Vec<[String; 8]> = d
            .connections
            .iter()
            .map(|c| {
                let total: u64 = c.requests.values().sum();
                let mut top: Vec<(&String, &u64)> = c.requests.iter().collect();
                top.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
                let top = top.iter().take(3).map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ");
                let sdk = match (&c.client_language, c.client_version) {
                    (Some(l), Some(v)) => format!("{l}/{v}"),
                    _ => "-".into(),
                };
                [
                    c.pod.clone(),
                    c.orig_dst.clone(),
                    human_secs(d.now_unix_ms.saturating_sub(c.opened_unix_ms) / 1000),
                    human_bytes(c.bytes_up),
                    human_bytes(c.bytes_down),
                    sdk,
                    if c.groups.is_empty() { "-".into() } else { c.groups.join(",") },
                    format!("{total} {top}"),
                ]
            })
            .collect();
        let header = ["POD", "ORIGINAL DST", "AGE", "UP", "DOWN", "SDK", "GROUPS", "REQUESTS"].map(String::from);
        let mut w = [0usize; 8];
        for r in std::iter::once(&header).chain(rows.iter()) {
            for (i, c) in r.iter().enumerate() {
                w[i] = w[i].max(c.len());
            }
        }
        for r in std::iter::once(&header).chain(rows.iter()) {
            let line: Vec<String> = r.iter().enumerate().map(|(i, c)| format!("{c:<width$}", width = w[i])).collect();
            o += line.join("  ").trim_end();
            o += "\n";
        }
    }
    if d.converted_groups.is_empty() {
        o += "\nPull→Pop conversion: no converted groups\n";
    } else {
        o += "\nconverted groups:\n";
        for g in &d.converted_groups {
            o += &format!("  {} / {}  pending receipts {}\n", g.group, g.topic, g.pending_receipts);
        }
    }
    o += &format!("Pop-native ack routes remembered: {}\n", d.pop_ack_routes);
    if !d.routes.is_empty() {
        o += "\nroute cache (from name-server answers):\n";
        for r in &d.routes {
            let brokers: Vec<String> = r
                .brokers
                .iter()
                .map(|b| {
                    let mut s = format!("{} {}", b.name, b.addr);
                    if !b.readable {
                        s += " not-readable";
                    }
                    if b.down {
                        s += " DOWN";
                    }
                    if b.pops_in_flight > 0 {
                        s += &format!(" pops={}", b.pops_in_flight);
                    }
                    s
                })
                .collect();
            o += &format!("  {}  {}\n", r.topic, brokers.join(", "));
        }
    }
    o
}

fn human_secs(s: u64) -> String {
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{}s", s / 60, s % 60),
        _ => format!("{}h{}m", s / 3600, (s % 3600) / 60),
    }
}

fn human_bytes(b: u64) -> String {
    match b {
        0..=1023 => format!("{b}B"),
        1024..=1_048_575 => format!("{:.1}KiB", b as f64 / 1024.0),
        _ => format!("{:.1}MiB", b as f64 / 1_048_576.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(pod: &str, groups: &[&str]) -> ConnectionView {
        ConnectionView {
            pod: pod.into(),
            orig_dst: "10.200.2.2:10911".into(),
            opened_unix_ms: 0,
            bytes_up: 2048,
            bytes_down: 10,
            requests: [("SEND_MESSAGE".to_string(), 3u64)].into_iter().collect(),
            client_language: Some("CPP".into()),
            client_version: Some(63),
            groups: groups.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn args(pod: Option<&str>, group: Option<&str>) -> StatusArgs {
        StatusArgs { output: Output::Table, pod: pod.map(Into::into), group: group.map(Into::into), file: None, socket: "/nonexistent".into() }
    }

    #[test]
    fn filters_by_pod_ip_and_group() {
        let a = conn("10.200.1.2:4000", &["g1"]);
        let b = conn("[fd00:200:1::2]:4000", &[]);
        assert!(keep(&a, &args(Some("10.200.1.2"), None)));
        assert!(!keep(&b, &args(Some("10.200.1.2"), None)));
        assert!(keep(&b, &args(Some("fd00:200:1::2"), None)));
        assert!(keep(&a, &args(None, Some("g1"))));
        assert!(!keep(&b, &args(None, Some("g1"))));
    }

    #[test]
    fn no_agent_is_a_clear_error() {
        let e = fetch(Path::new("/nonexistent/admin.sock")).unwrap_err().to_string();
        assert!(e.contains("no rmq-agent is running"), "{e}");
    }

    #[test]
    fn table_shows_connections_and_sdk() {
        let d = StateDump {
            pid: 1,
            version: "0.1.0".into(),
            generation: 2,
            started_unix_ms: 0,
            now_unix_ms: 61_000,
            ready: true,
            draining: false,
            listeners: vec![],
            connections: vec![conn("10.200.1.2:4000", &["g1"])],
            converted_groups: vec![],
            pop_ack_routes: 7,
            routes: vec![crate::state::RouteView { topic: "T".into(), brokers: vec![crate::state::RouteBrokerView { name: "broker-a".into(), addr: "10.0.0.9:10911".into(), readable: true, down: true, pops_in_flight: 2 }] }],
        };
        let t = table(&d);
        assert!(t.contains("ack routes remembered: 7"), "{t}");
        assert!(t.contains("T  broker-a 10.0.0.9:10911 DOWN pops=2"), "{t}");
        assert!(t.contains("generation 2") && t.contains("ready") && t.contains("up 1m1s"), "{t}");
        assert!(t.contains("10.200.1.2:4000") && t.contains("CPP/63") && t.contains("SEND_MESSAGE=3") && t.contains("2.0KiB"), "{t}");
    }
}
