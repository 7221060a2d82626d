//! The host's iptables backend (nft or legacy, never both), driven through the
//! `iptables` crate, behind [`RuleBackend`] so tests can use a fake.
use std::time::Duration;

use crate::conf::BackendSetting;
use crate::exec;
use crate::rules::{Family, Rule};

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("{cmd} failed: {stderr}")]
    Command { cmd: String, stderr: String },
    #[error("{0}")]
    Timeout(String),
    #[error("no iptables binary found (looked for {0}); install the iptables package on the node")]
    Missing(String),
}

/// Rule operations the plugin needs; `spec` is the part after `-A CHAIN`.
pub trait RuleBackend {
    fn name(&self) -> String;
    fn chain_exists(&self, f: Family, table: &str, chain: &str) -> Result<bool, BackendError>;
    fn new_chain(&self, f: Family, table: &str, chain: &str) -> Result<(), BackendError>;
    fn delete_chain(&self, f: Family, table: &str, chain: &str) -> Result<(), BackendError>;
    fn exists(&self, f: Family, rule: &Rule) -> Result<bool, BackendError>;
    fn add(&self, f: Family, rule: &Rule) -> Result<(), BackendError>;
    fn delete_spec(&self, f: Family, table: &str, chain: &str, spec: &str) -> Result<(), BackendError>;
    /// `-S chain`, one `-A …` line per rule.
    fn list(&self, f: Family, table: &str, chain: &str) -> Result<Vec<String>, BackendError>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    Nft,
    Legacy,
}

impl Flavor {
    pub fn binary(self, f: Family) -> &'static str {
        match (self, f) {
            (Flavor::Nft, Family::V4) => "iptables-nft",
            (Flavor::Nft, Family::V6) => "ip6tables-nft",
            (Flavor::Legacy, Family::V4) => "iptables-legacy",
            (Flavor::Legacy, Family::V6) => "ip6tables-legacy",
        }
    }
}

/// Picks the backend the node already uses: the one holding our chains, else the one
/// with more rules (kube-proxy's), else what `iptables` itself is (Debian: nft).
pub fn detect(setting: BackendSetting, limit: Duration) -> Result<Flavor, BackendError> {
    let have = |fl: Flavor| exec::find_program(fl.binary(Family::V4)).is_some();
    match setting {
        BackendSetting::Nft => return Ok(Flavor::Nft),
        BackendSetting::Legacy => return Ok(Flavor::Legacy),
        BackendSetting::Auto => {}
    }
    match (have(Flavor::Nft), have(Flavor::Legacy)) {
        (false, false) => {
            // A plain `iptables` of unknown flavor: ask it.
            return Ok(plain_flavor(limit).ok_or_else(|| BackendError::Missing("iptables-nft, iptables-legacy, iptables".into()))?);
        }
        (true, false) => return Ok(Flavor::Nft),
        (false, true) => return Ok(Flavor::Legacy),
        (true, true) => {}
    }
    let score = |fl: Flavor| -> (bool, usize) {
        let mut ours = false;
        let mut rules = 0;
        for f in [Family::V4, Family::V6] {
            let save = format!("{}-save", fl.binary(f));
            if let Ok(out) = exec::run(&save, &[], limit) {
                let text = String::from_utf8_lossy(&out.stdout);
                ours |= text.contains(rmq_common::CHAIN_TPROXY) || text.contains(rmq_common::CHAIN_REDIRECT);
                rules += text.lines().filter(|l| l.starts_with("-A ")).count();
            }
        }
        (ours, rules)
    };
    let (nft, legacy) = (score(Flavor::Nft), score(Flavor::Legacy));
    Ok(match (nft, legacy) {
        ((true, _), _) => Flavor::Nft,
        (_, (true, _)) => Flavor::Legacy,
        ((_, n), (_, l)) if l > n => Flavor::Legacy,
        ((_, n), (_, l)) if n > l => Flavor::Nft,
        _ => plain_flavor(limit).unwrap_or(Flavor::Nft),
    })
}

fn plain_flavor(limit: Duration) -> Option<Flavor> {
    let out = exec::run("iptables", &["--version"], limit).ok()?;
    let v = String::from_utf8_lossy(&out.stdout);
    if v.contains("legacy") {
        Some(Flavor::Legacy)
    } else if v.contains("nf_tables") {
        Some(Flavor::Nft)
    } else {
        None
    }
}

/// The real backend: the `iptables` crate pointed at the detected flavor's binaries.
pub struct Xtables {
    flavor: Flavor,
    limit: Duration,
}

impl Xtables {
    pub fn new(flavor: Flavor, limit: Duration) -> Result<Self, BackendError> {
        for f in [Family::V4, Family::V6] {
            if exec::find_program(flavor.binary(f)).is_none() {
                return Err(BackendError::Missing(flavor.binary(f).into()));
            }
        }
        Ok(Xtables { flavor, limit })
    }

    /// One iptables call: `-w <secs>` bounds the wait for the xtables lock, and a
    /// watchdog bounds the whole call.
    fn call(&self, f: Family, table: &str, command: String) -> Result<std::process::Output, BackendError> {
        let bin = self.flavor.binary(f);
        let wait = self.limit.as_secs().max(1);
        let table_owned = table.to_string();
        let full = format!("-w {wait} {command}");
        let shown = format!("{bin} -t {table} {full}");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // The crate's own --wait (unbounded) is off; we pass `-w <secs>` ourselves.
            let ipt = iptables::IPTables { cmd: bin, has_check: true, has_wait: false, is_numeric: false };
            let r = ipt.execute(&table_owned, &full).map_err(|e| e.to_string());
            let _ = tx.send(r);
        });
        let out = rx
            .recv_timeout(self.limit + Duration::from_secs(2))
            .map_err(|_| BackendError::Timeout(format!("{shown} did not finish within {:?}", self.limit)))?
            .map_err(|e| BackendError::Command { cmd: shown.clone(), stderr: e })?;
        Ok(out)
    }

    fn ok(&self, f: Family, table: &str, command: String) -> Result<std::process::Output, BackendError> {
        let shown = format!("{} -t {table} {command}", self.flavor.binary(f));
        let out = self.call(f, table, command)?;
        if out.status.success() {
            Ok(out)
        } else {
            Err(BackendError::Command { cmd: shown, stderr: String::from_utf8_lossy(&out.stderr).trim().to_string() })
        }
    }
}

impl RuleBackend for Xtables {
    fn name(&self) -> String {
        format!("{:?}", self.flavor).to_lowercase()
    }
    fn chain_exists(&self, f: Family, table: &str, chain: &str) -> Result<bool, BackendError> {
        Ok(self.call(f, table, format!("-S {chain}"))?.status.success())
    }
    fn new_chain(&self, f: Family, table: &str, chain: &str) -> Result<(), BackendError> {
        self.ok(f, table, format!("-N {chain}")).map(drop)
    }
    fn delete_chain(&self, f: Family, table: &str, chain: &str) -> Result<(), BackendError> {
        self.ok(f, table, format!("-F {chain}"))?;
        self.ok(f, table, format!("-X {chain}")).map(drop)
    }
    fn exists(&self, f: Family, rule: &Rule) -> Result<bool, BackendError> {
        let out = self.call(f, rule.table, format!("-C {} {}", rule.chain, rule.spec()))?;
        match out.status.code() {
            Some(0) => Ok(true),
            Some(1) => Ok(false),
            _ => Err(BackendError::Command {
                cmd: format!("{} -C {} {}", self.flavor.binary(f), rule.chain, rule.spec()),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            }),
        }
    }
    fn add(&self, f: Family, rule: &Rule) -> Result<(), BackendError> {
        let op = if rule.first { format!("-I {} 1", rule.chain) } else { format!("-A {}", rule.chain) };
        self.ok(f, rule.table, format!("{op} {}", rule.spec())).map(drop)
    }
    fn delete_spec(&self, f: Family, table: &str, chain: &str, spec: &str) -> Result<(), BackendError> {
        self.ok(f, table, format!("-D {chain} {spec}")).map(drop)
    }
    fn list(&self, f: Family, table: &str, chain: &str) -> Result<Vec<String>, BackendError> {
        let out = self.ok(f, table, format!("-S {chain}"))?;
        Ok(String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.starts_with("-A ")).map(str::to_string).collect())
    }
}

/// Whether an `iptables -S` line carries exactly this comment (not one that merely starts with it).
pub fn line_has_comment(line: &str, comment: &str) -> bool {
    let mut it = line.split_whitespace();
    while let Some(tok) = it.next() {
        if tok == "--comment" {
            if let Some(v) = it.next() {
                if v.trim_matches('"') == comment {
                    return true;
                }
            }
        }
    }
    false
}

/// `-A CHAIN spec…` → `spec…`.
pub fn spec_of_line(line: &str) -> Option<&str> {
    let rest = line.strip_prefix("-A ")?;
    let (_, spec) = rest.split_once(' ')?;
    Some(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comment_match_is_exact() {
        let l = "-A RMQ_AGENT_TPROXY -s 10.0.0.2/32 -m comment --comment rmq-agent:abc -j TPROXY";
        assert!(line_has_comment(l, "rmq-agent:abc"));
        assert!(!line_has_comment(l, "rmq-agent:ab"));
        assert!(line_has_comment("-A X -m comment --comment \"rmq-agent:abc\" -j ACCEPT", "rmq-agent:abc"));
        assert_eq!(spec_of_line(l).unwrap(), "-s 10.0.0.2/32 -m comment --comment rmq-agent:abc -j TPROXY");
    }
}
