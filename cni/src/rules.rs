//! Pure generation of the iptables rule sets (no I/O), so they can be golden-tested.
//!
//! Shared plumbing, per family, installed once and never removed by DEL:
//!   mangle RMQ_AGENT_DIVERT: `-j MARK --set-xmark <mark>`, `-j ACCEPT`
//!   mangle PREROUTING (first): `-p tcp -m socket --transparent -j RMQ_AGENT_DIVERT`
//!   mangle PREROUTING: `-j RMQ_AGENT_TPROXY`;  nat PREROUTING: `-j RMQ_AGENT_REDIRECT`
//! Per pod and address: one rule in RMQ_AGENT_TPROXY (tproxy) or RMQ_AGENT_REDIRECT
//! (redirect), commented `rmq-agent:<container id>` so DEL finds exactly that pod's rules.
use std::fmt::Write as _;
use std::net::IpAddr;

use rmq_common::{
    CAPTURE_MARK, CAPTURE_MASK, CHAIN_DIVERT, CHAIN_REDIRECT, CHAIN_TPROXY, ROUTE_TABLE, RULE_COMMENT_PREFIX,
    RULE_PRIORITY,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(ip: &IpAddr) -> Self {
        if ip.is_ipv4() { Family::V4 } else { Family::V6 }
    }
    pub fn iptables(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }
    fn host_prefix(self) -> u8 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }
    fn any(self) -> &'static str {
        match self {
            Family::V4 => "0.0.0.0",
            Family::V6 => "::",
        }
    }
}

/// How one pod address is captured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Tproxy,
    Redirect,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Tproxy => "tproxy",
            Mode::Redirect => "redirect",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub table: &'static str,
    pub name: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub table: &'static str,
    pub chain: &'static str,
    /// Insert at position 1 instead of appending (the divert rule must see
    /// established transparent-socket packets before anything else marks them).
    pub first: bool,
    pub args: Vec<String>,
}

impl Rule {
    fn new(table: &'static str, chain: &'static str, args: &[&str]) -> Self {
        Rule { table, chain, first: false, args: args.iter().map(|s| s.to_string()).collect() }
    }
    /// The rule specification (everything after `-A CHAIN`); arguments never contain spaces.
    pub fn spec(&self) -> String {
        self.args.join(" ")
    }
    /// `-t TABLE -A|-I CHAIN [1] SPEC`, the form in golden files and logs.
    pub fn render(&self) -> String {
        let op = if self.first { format!("-I {} 1", self.chain) } else { format!("-A {}", self.chain) };
        format!("-t {} {} {}", self.table, op, self.spec())
    }
}

pub fn mark_arg() -> String {
    format!("0x{CAPTURE_MARK:x}/0x{CAPTURE_MASK:x}")
}

/// The comment that tags every rule of one pod.
pub fn pod_comment(container_id: &str) -> String {
    format!("{RULE_COMMENT_PREFIX}{container_id}")
}

/// Our chains, in creation order.
pub fn chains() -> Vec<Chain> {
    vec![
        Chain { table: "mangle", name: CHAIN_DIVERT },
        Chain { table: "mangle", name: CHAIN_TPROXY },
        Chain { table: "nat", name: CHAIN_REDIRECT },
    ]
}

/// Shared rules (same for both families), in install order.
pub fn shared_rules() -> Vec<Rule> {
    let mark = mark_arg();
    let mut divert = Rule::new("mangle", "PREROUTING", &["-p", "tcp", "-m", "socket", "--transparent", "-j", CHAIN_DIVERT]);
    divert.first = true;
    vec![
        Rule::new("mangle", CHAIN_DIVERT, &["-j", "MARK", "--set-xmark", &mark]),
        Rule::new("mangle", CHAIN_DIVERT, &["-j", "ACCEPT"]),
        divert,
        Rule::new("mangle", "PREROUTING", &["-j", CHAIN_TPROXY]),
        Rule::new("nat", "PREROUTING", &["-j", CHAIN_REDIRECT]),
    ]
}

/// The capture rule of one pod address.
pub fn pod_rule(ip: &IpAddr, mode: Mode, ports: &[u16], agent_port: u16, container_id: &str) -> Rule {
    let family = Family::of(ip);
    let src = format!("{ip}/{}", family.host_prefix());
    let ports = ports.iter().map(u16::to_string).collect::<Vec<_>>().join(",");
    let comment = pod_comment(container_id);
    let on_port = agent_port.to_string();
    let mut args = vec!["-s", &src, "-p", "tcp", "-m", "multiport", "--dports", &ports, "-m", "comment", "--comment", &comment];
    let mark = mark_arg();
    let (table, chain) = match mode {
        Mode::Tproxy => {
            args.extend(["-j", "TPROXY", "--on-port", &on_port, "--on-ip", family.any(), "--tproxy-mark", &mark]);
            ("mangle", CHAIN_TPROXY)
        }
        Mode::Redirect => {
            args.extend(["-j", "REDIRECT", "--to-ports", &on_port]);
            ("nat", CHAIN_REDIRECT)
        }
    };
    Rule::new(table, chain, &args)
}

/// Policy routing, as `ip` would show it (rendered for golden files and messages).
pub fn policy_routing(family: Family) -> [String; 2] {
    let (flag, dst) = match family {
        Family::V4 => ("-4", "0.0.0.0/0"),
        Family::V6 => ("-6", "::/0"),
    };
    [
        format!("ip {flag} rule add fwmark {} lookup {ROUTE_TABLE} priority {RULE_PRIORITY}", mark_arg()),
        format!("ip {flag} route replace local {dst} dev lo table {ROUTE_TABLE}"),
    ]
}

/// Everything one ADD installs, rendered as commands (golden files, `--dry-run` style logs).
pub fn render_plan(pods: &[(IpAddr, Mode)], ports: &[u16], agent_port: u16, container_id: &str) -> String {
    let mut out = String::new();
    let mut families: Vec<Family> = pods.iter().map(|(ip, _)| Family::of(ip)).collect();
    families.sort();
    families.dedup();
    for family in families {
        let _ = writeln!(out, "# {}", family.iptables());
        for c in chains() {
            let _ = writeln!(out, "-t {} -N {}", c.table, c.name);
        }
        for r in shared_rules() {
            let _ = writeln!(out, "{}", r.render());
        }
        for (ip, mode) in pods.iter().filter(|(ip, _)| Family::of(ip) == family) {
            let _ = writeln!(out, "{}", pod_rule(ip, *mode, ports, agent_port, container_id).render());
        }
        for line in policy_routing(family) {
            let _ = writeln!(out, "{line}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comment_is_prefix_plus_id() {
        assert_eq!(pod_comment("abc"), format!("{RULE_COMMENT_PREFIX}abc"));
    }

    /// Golden files of the full plan; `RMQ_UPDATE_GOLDEN=1` rewrites them after a
    /// deliberate change (review the diff: these are the rules every node gets).
    #[test]
    fn plans_match_golden_files() {
        let cases: [(&str, Vec<(IpAddr, Mode)>); 2] = [
            ("plan_tproxy_dual_stack.txt", vec![("10.22.0.5".parse().unwrap(), Mode::Tproxy), ("fd00:22::5".parse().unwrap(), Mode::Tproxy)]),
            ("plan_redirect_v4.txt", vec![("10.22.0.6".parse().unwrap(), Mode::Redirect)]),
        ];
        for (name, pods) in cases {
            let got = render_plan(&pods, &rmq_common::DEFAULT_ROCKETMQ_PORTS, rmq_common::AGENT_PORT, "0123abcd");
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(name);
            if std::env::var_os("RMQ_UPDATE_GOLDEN").is_some() {
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(&path, &got).unwrap();
            }
            let want = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert_eq!(got, want, "{name} differs");
        }
    }

    #[test]
    fn v6_rule_uses_128_and_any6() {
        let r = pod_rule(&"fd00::2".parse().unwrap(), Mode::Tproxy, &[9876], 15001, "c");
        assert!(r.spec().starts_with("-s fd00::2/128 "));
        assert!(r.spec().contains("--on-ip ::"));
    }
}
