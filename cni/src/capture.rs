//! ADD / DEL / CHECK of one pod's capture, on top of [`RuleBackend`] and [`Routing`].
//! ADD is all-or-nothing: every change is journaled and undone if a later step fails.
use std::net::IpAddr;

use rmq_common::{CHAIN_REDIRECT, CHAIN_TPROXY};

use crate::backend::{line_has_comment, spec_of_line, BackendError, RuleBackend};
use crate::conf::CaptureSetting;
use crate::error::{CniError, Code};
use crate::log;
use crate::route::{Added, RouteError, Routing};
use crate::rules::{self, Family, Mode, Rule};

/// Chains that hold per-pod rules.
const POD_CHAINS: [(&str, &str); 2] = [("mangle", CHAIN_TPROXY), ("nat", CHAIN_REDIRECT)];

pub struct Node<'a> {
    pub backend: &'a dyn RuleBackend,
    pub routing: &'a dyn Routing,
}

/// What one pod gets: its addresses, each with its capture mode.
#[derive(Debug, Clone)]
pub struct PodCapture {
    pub container_id: String,
    pub targets: Vec<(IpAddr, Mode)>,
    pub ports: Vec<u16>,
    pub agent_port: u16,
}

impl PodCapture {
    fn rules(&self) -> Vec<(Family, Rule)> {
        self.targets
            .iter()
            .map(|(ip, mode)| (Family::of(ip), rules::pod_rule(ip, *mode, &self.ports, self.agent_port, &self.container_id)))
            .collect()
    }
    fn families(&self) -> Vec<Family> {
        let mut f: Vec<Family> = self.targets.iter().map(|(ip, _)| Family::of(ip)).collect();
        f.sort();
        f.dedup();
        f
    }
}

/// `auto`: REDIRECT where the pod sits behind a Linux bridge whose traffic goes through
/// iptables (br_netfilter, `bridge-nf-call-ip[6]tables=1`): TPROXY silently fails there.
pub fn resolve_modes(
    setting: CaptureSetting,
    ips: &[IpAddr],
    host_ifaces: &[&str],
    routing: &dyn Routing,
    bridge_nf_call: impl Fn(Family) -> bool,
) -> Result<Vec<(IpAddr, Mode)>, CniError> {
    let mut out = Vec::new();
    for ip in ips {
        let mode = match setting {
            CaptureSetting::Tproxy => Mode::Tproxy,
            CaptureSetting::Redirect => Mode::Redirect,
            CaptureSetting::Auto => {
                let bridged = routing.behind_bridge(host_ifaces, ip).map_err(|e| route_err("inspect the pod's host interface", e))?;
                if bridged && bridge_nf_call(Family::of(ip)) { Mode::Redirect } else { Mode::Tproxy }
            }
        };
        out.push((*ip, mode));
    }
    Ok(out)
}

enum Undo {
    Chain(Family, &'static str, &'static str),
    Rule(Family, Rule),
    Route(Family, Added),
}

fn ipt_err(what: &str, e: BackendError) -> CniError {
    let code = if matches!(e, BackendError::Timeout(_)) { Code::TryAgainLater } else { Code::CaptureInstall };
    CniError::new(
        code,
        format!("rmq-cni could not {what}; the pod was not started so that its RocketMQ traffic is never uncaptured"),
        format!("{e}. Check that the node has the iptables TPROXY/socket/comment/multiport matches (xt_TPROXY, xt_socket) and that rmq-cni runs as root"),
    )
}

fn route_err(what: &str, e: RouteError) -> CniError {
    let code = if matches!(e, RouteError::Timeout(_)) { Code::TryAgainLater } else { Code::CaptureInstall };
    CniError::new(code, format!("rmq-cni could not {what}"), format!("{e}. rmq-cni needs CAP_NET_ADMIN in the node's network namespace, and IPv6 enabled on lo (sysctl net.ipv6.conf.lo.disable_ipv6=0) when pods get IPv6 addresses"))
}

/// Rules of other containers for these pod addresses and any of these ports: left by a
/// DEL that never ran (the pod's IP is now someone else's). Removing them keeps a reused
/// IP from inheriting a capture, e.g. when it now belongs to an excluded pod.
pub fn purge_stale(node: &Node, ips: &[IpAddr], ports: &[u16], keep_container_id: &str) -> Result<usize, CniError> {
    let keep = rules::pod_comment(keep_container_id);
    let sources: Vec<String> = ips.iter().map(|ip| format!("{ip}/{}", if ip.is_ipv4() { 32 } else { 128 })).collect();
    delete_matching(node, "WARN", "removed a stale rule of another container for a reused pod IP", |line| {
        let toks: Vec<&str> = line.split_whitespace().map(|t| t.trim_matches('"')).collect();
        let after = |k: &str| toks.iter().position(|t| *t == k).and_then(|i| toks.get(i + 1)).copied();
        let (Some(src), Some(dports), Some(comment)) = (after("-s"), after("--dports"), after("--comment")) else { return false };
        let overlap = dports.split(',').filter_map(|p| p.parse::<u16>().ok()).any(|p| ports.contains(&p));
        sources.iter().any(|s| s == src) && overlap && comment != keep && comment.starts_with(rmq_common::RULE_COMMENT_PREFIX)
    })
}

/// Deletes every per-pod rule (both families, both pod chains) for which `pick` is true.
fn delete_matching(node: &Node, level: &str, what: &str, pick: impl Fn(&str) -> bool) -> Result<usize, CniError> {
    let b = node.backend;
    let mut removed = 0;
    for f in [Family::V4, Family::V6] {
        for (table, chain) in POD_CHAINS {
            if !b.chain_exists(f, table, chain).map_err(|e| ipt_err("inspect its chains", e))? {
                continue;
            }
            for line in b.list(f, table, chain).map_err(|e| ipt_err("list its rules", e))? {
                if !pick(&line) {
                    continue;
                }
                if let Some(spec) = spec_of_line(&line) {
                    b.delete_spec(f, table, chain, spec).map_err(|e| ipt_err(&format!("delete `{line}`"), e))?;
                    log::write(level, &format!("{}: {what}: {line}", f.iptables()));
                    removed += 1;
                }
            }
        }
    }
    Ok(removed)
}

/// ADD: shared plumbing (idempotent), then the pod's rules, then policy routing.
pub fn add(node: &Node, pod: &PodCapture) -> Result<(), CniError> {
    // A retried ADD must not leave two copies.
    del(node, &pod.container_id)?;
    let ips: Vec<IpAddr> = pod.targets.iter().map(|(ip, _)| *ip).collect();
    purge_stale(node, &ips, &pod.ports, &pod.container_id)?;
    let mut journal = Vec::new();
    let r = add_journaled(node, pod, &mut journal);
    if let Err(e) = &r {
        log::error(format!("ADD failed, rolling back {} change(s): {e}", journal.len()));
        rollback(node, journal);
    }
    r
}

fn add_journaled(node: &Node, pod: &PodCapture, journal: &mut Vec<Undo>) -> Result<(), CniError> {
    let b = node.backend;
    for f in pod.families() {
        for c in rules::chains() {
            if !b.chain_exists(f, c.table, c.name).map_err(|e| ipt_err("inspect its chains", e))? {
                b.new_chain(f, c.table, c.name).map_err(|e| ipt_err(&format!("create chain {} {}", c.table, c.name), e))?;
                journal.push(Undo::Chain(f, c.table, c.name));
            }
        }
        for r in rules::shared_rules() {
            if !b.exists(f, &r).map_err(|e| ipt_err("inspect its shared rules", e))? {
                b.add(f, &r).map_err(|e| ipt_err(&format!("add `{}`", r.render()), e))?;
                journal.push(Undo::Rule(f, r));
            }
        }
    }
    for (f, r) in pod.rules() {
        b.add(f, &r).map_err(|e| ipt_err(&format!("add `{}`", r.render()), e))?;
        log::info(format!("{}: {}", b.name(), r.render()));
        journal.push(Undo::Rule(f, r));
    }
    for f in pod.families() {
        for a in node.routing.ensure(f).map_err(|e| route_err("install the fwmark policy routing", e))? {
            journal.push(Undo::Route(f, a));
        }
    }
    Ok(())
}

fn rollback(node: &Node, journal: Vec<Undo>) {
    for u in journal.into_iter().rev() {
        let r = match &u {
            Undo::Chain(f, t, c) => node.backend.delete_chain(*f, t, c).map_err(|e| e.to_string()),
            Undo::Rule(f, r) => node.backend.delete_spec(*f, r.table, r.chain, &r.spec()).map_err(|e| e.to_string()),
            Undo::Route(f, a) => node.routing.remove(*f, a).map_err(|e| e.to_string()),
        };
        if let Err(e) = r {
            log::error(format!("rollback step failed: {e}"));
        }
    }
}

/// DEL: every rule carrying this container's comment, in both families; nothing else.
/// Succeeds when nothing is there.
pub fn del(node: &Node, container_id: &str) -> Result<usize, CniError> {
    let comment = rules::pod_comment(container_id);
    delete_matching(node, "INFO", "deleted", |line| line_has_comment(line, &comment))
}

/// CHECK: the pod's rules, the shared plumbing and the policy routing are all in place,
/// and no rule of this pod exists that should not.
pub fn check(node: &Node, pod: &PodCapture) -> Result<(), CniError> {
    let b = node.backend;
    let e = |x| ipt_err("inspect the rules", x);
    let mut missing = Vec::new();
    for f in pod.families() {
        for c in rules::chains() {
            if !b.chain_exists(f, c.table, c.name).map_err(e)? {
                missing.push(format!("{}: chain {} {}", f.iptables(), c.table, c.name));
            }
        }
        if !missing.is_empty() {
            continue;
        }
        for r in rules::shared_rules() {
            if !b.exists(f, &r).map_err(e)? {
                missing.push(format!("{} {}", f.iptables(), r.render()));
            }
        }
        missing.extend(node.routing.missing(f).map_err(|x| route_err("inspect policy routing", x))?);
    }
    let expected = pod.rules();
    for (f, r) in &expected {
        if b.chain_exists(*f, r.table, r.chain).map_err(e)? && !b.exists(*f, r).map_err(e)? {
            missing.push(format!("{} {}", f.iptables(), r.render()));
        }
    }
    let comment = rules::pod_comment(&pod.container_id);
    let mut unexpected = Vec::new();
    for f in [Family::V4, Family::V6] {
        for (table, chain) in POD_CHAINS {
            if !b.chain_exists(f, table, chain).map_err(e)? {
                continue;
            }
            for line in b.list(f, table, chain).map_err(e)? {
                let ours = line_has_comment(&line, &comment);
                let wanted = expected.iter().any(|(ef, r)| *ef == f && r.chain == chain && spec_of_line(&line).is_some_and(|s| same_rule(s, r)));
                if ours && !wanted {
                    unexpected.push(format!("{} {line}", f.iptables()));
                }
            }
        }
    }
    if missing.is_empty() && unexpected.is_empty() {
        return Ok(());
    }
    let mut msg = format!("rmq-cni CHECK failed for container {}: the pod's RocketMQ capture is not intact", pod.container_id);
    if !missing.is_empty() {
        msg.push_str(&format!("; missing: {}", missing.join(" | ")));
    }
    if !unexpected.is_empty() {
        msg.push_str(&format!("; unexpected: {}", unexpected.join(" | ")));
    }
    Err(CniError::new(
        Code::CaptureCheck,
        msg,
        "recreate the pod (CNI DEL + ADD) to reinstall its capture; if rules keep vanishing, look for another component flushing the mangle/nat tables",
    ))
}

/// iptables prints rules in its own canonical form; compare the parts we generate
/// (addresses, ports, comment, target) token-insensitively to spacing and quoting.
fn same_rule(listed: &str, r: &Rule) -> bool {
    let norm = |s: &str| -> Vec<String> { s.split_whitespace().map(|t| t.trim_matches('"').to_string()).collect() };
    let listed = norm(listed);
    let want = norm(&r.spec());
    let pos = |v: &[String], k: &str| v.iter().position(|t| t == k).and_then(|i| v.get(i + 1).cloned());
    ["-s", "--dports", "--comment", "-j", "--on-port", "--to-ports"].iter().all(|k| pos(&listed, k) == pos(&want, k))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::BTreeMap;

    /// In-memory iptables: (family, table, chain) → rule specs; can fail the n-th add.
    #[derive(Default)]
    struct Fake {
        chains: RefCell<BTreeMap<(Family, String, String), Vec<String>>>,
        fail_add_at: RefCell<Option<usize>>,
        adds: RefCell<usize>,
    }
    impl Fake {
        fn with_builtins() -> Self {
            let f = Fake::default();
            for fam in [Family::V4, Family::V6] {
                for (t, c) in [("mangle", "PREROUTING"), ("nat", "PREROUTING")] {
                    f.chains.borrow_mut().insert((fam, t.into(), c.into()), vec![]);
                }
            }
            f
        }
        fn total_rules(&self) -> usize {
            self.chains.borrow().values().map(Vec::len).sum()
        }
    }
    fn err() -> BackendError {
        BackendError::Command { cmd: "fake".into(), stderr: "injected".into() }
    }
    impl RuleBackend for Fake {
        fn name(&self) -> String {
            "fake".into()
        }
        fn chain_exists(&self, f: Family, t: &str, c: &str) -> Result<bool, BackendError> {
            Ok(self.chains.borrow().contains_key(&(f, t.into(), c.into())))
        }
        fn new_chain(&self, f: Family, t: &str, c: &str) -> Result<(), BackendError> {
            self.chains.borrow_mut().insert((f, t.into(), c.into()), vec![]);
            Ok(())
        }
        fn delete_chain(&self, f: Family, t: &str, c: &str) -> Result<(), BackendError> {
            self.chains.borrow_mut().remove(&(f, t.into(), c.into()));
            Ok(())
        }
        fn exists(&self, f: Family, r: &Rule) -> Result<bool, BackendError> {
            Ok(self.chains.borrow().get(&(f, r.table.into(), r.chain.into())).is_some_and(|v| v.contains(&r.spec())))
        }
        fn add(&self, f: Family, r: &Rule) -> Result<(), BackendError> {
            *self.adds.borrow_mut() += 1;
            if Some(*self.adds.borrow()) == *self.fail_add_at.borrow() {
                return Err(err());
            }
            let mut m = self.chains.borrow_mut();
            let v = m.get_mut(&(f, r.table.into(), r.chain.into())).ok_or_else(err)?;
            if r.first { v.insert(0, r.spec()) } else { v.push(r.spec()) }
            Ok(())
        }
        fn delete_spec(&self, f: Family, t: &str, c: &str, spec: &str) -> Result<(), BackendError> {
            let mut m = self.chains.borrow_mut();
            let v = m.get_mut(&(f, t.into(), c.into())).ok_or_else(err)?;
            let i = v.iter().position(|s| s == spec).ok_or_else(err)?;
            v.remove(i);
            Ok(())
        }
        fn list(&self, f: Family, t: &str, c: &str) -> Result<Vec<String>, BackendError> {
            Ok(self.chains.borrow().get(&(f, t.into(), c.into())).map(|v| v.iter().map(|s| format!("-A {c} {s}")).collect()).unwrap_or_default())
        }
    }

    #[derive(Default)]
    struct FakeRoutes {
        present: RefCell<Vec<(Family, Added)>>,
        bridged: bool,
        fail: bool,
    }
    impl Routing for FakeRoutes {
        fn ensure(&self, f: Family) -> Result<Vec<Added>, RouteError> {
            if self.fail {
                return Err(RouteError::Netlink { what: "add".into(), err: "injected".into() });
            }
            let mut added = vec![];
            for a in [Added::Rule, Added::Route] {
                if !self.present.borrow().contains(&(f, a)) {
                    self.present.borrow_mut().push((f, a));
                    added.push(a);
                }
            }
            Ok(added)
        }
        fn remove(&self, f: Family, a: &Added) -> Result<(), RouteError> {
            self.present.borrow_mut().retain(|x| *x != (f, *a));
            Ok(())
        }
        fn missing(&self, f: Family) -> Result<Vec<String>, RouteError> {
            Ok([Added::Rule, Added::Route].iter().filter(|a| !self.present.borrow().contains(&(f, **a))).map(|a| format!("{a:?}")).collect())
        }
        fn behind_bridge(&self, _: &[&str], _: &IpAddr) -> Result<bool, RouteError> {
            Ok(self.bridged)
        }
    }

    fn pod(id: &str, ips: &[&str], mode: Mode) -> PodCapture {
        PodCapture {
            container_id: id.into(),
            targets: ips.iter().map(|s| (s.parse().unwrap(), mode)).collect(),
            ports: rmq_common::DEFAULT_ROCKETMQ_PORTS.to_vec(),
            agent_port: rmq_common::AGENT_PORT,
        }
    }

    #[test]
    fn add_check_del_roundtrip() {
        let (b, r) = (Fake::with_builtins(), FakeRoutes::default());
        let node = Node { backend: &b, routing: &r };
        let p = pod("c1", &["10.0.0.2", "fd00::2"], Mode::Tproxy);
        add(&node, &p).unwrap();
        add(&node, &p).unwrap(); // retried ADD: no duplicate
        let q = pod("c2", &["10.0.0.3"], Mode::Redirect);
        add(&node, &q).unwrap();
        check(&node, &p).unwrap();
        check(&node, &q).unwrap();
        let before = b.total_rules();
        assert_eq!(del(&node, "c1").unwrap(), 2);
        assert_eq!(b.total_rules(), before - 2);
        assert_eq!(del(&node, "c1").unwrap(), 0);
        assert!(check(&node, &p).is_err());
        check(&node, &q).unwrap();
    }

    #[test]
    fn add_purges_a_stale_rule_for_a_reused_ip_but_not_other_ports() {
        let (b, r) = (Fake::with_builtins(), FakeRoutes::default());
        let node = Node { backend: &b, routing: &r };
        let old = pod("old", &["10.0.0.2"], Mode::Tproxy);
        add(&node, &old).unwrap();
        // Another capture of the same address on other ports (the benchmark's second proxy).
        let mut other = pod("other-ports", &["10.0.0.2"], Mode::Tproxy);
        other.ports = vec![20911];
        add(&node, &other).unwrap();
        let new = pod("new", &["10.0.0.2"], Mode::Redirect);
        add(&node, &new).unwrap();
        assert!(check(&node, &old).is_err(), "the stale rule survived");
        check(&node, &other).unwrap();
        check(&node, &new).unwrap();
        assert_eq!(purge_stale(&node, &["10.0.0.2".parse().unwrap()], &[9876], "nobody").unwrap(), 1);
        assert!(check(&node, &new).is_err());
    }

    #[test]
    fn failed_add_leaves_nothing() {
        for fail_at in 1..=12 {
            let b = Fake::with_builtins();
            *b.fail_add_at.borrow_mut() = Some(fail_at);
            let r = FakeRoutes::default();
            let node = Node { backend: &b, routing: &r };
            let e = add(&node, &pod("c1", &["10.0.0.2", "fd00::2"], Mode::Tproxy)).unwrap_err();
            assert_eq!(e.code(), Code::CaptureInstall);
            assert_eq!(b.total_rules(), 0, "fail at add #{fail_at}");
            assert_eq!(b.chains.borrow().len(), 4, "only builtins remain (fail at #{fail_at})");
            assert!(r.present.borrow().is_empty());
        }
    }

    #[test]
    fn failed_routing_rolls_back_rules() {
        let b = Fake::with_builtins();
        let r = FakeRoutes { fail: true, ..Default::default() };
        let node = Node { backend: &b, routing: &r };
        assert!(add(&node, &pod("c1", &["10.0.0.2"], Mode::Tproxy)).is_err());
        assert_eq!(b.total_rules(), 0);
    }

    #[test]
    fn failed_add_keeps_other_pods() {
        let b = Fake::with_builtins();
        let r = FakeRoutes::default();
        let node = Node { backend: &b, routing: &r };
        let p = pod("c1", &["10.0.0.2"], Mode::Tproxy);
        add(&node, &p).unwrap();
        *b.fail_add_at.borrow_mut() = Some(*b.adds.borrow() + 1);
        assert!(add(&node, &pod("c2", &["10.0.0.3"], Mode::Tproxy)).is_err());
        check(&node, &p).unwrap();
    }

    #[test]
    fn check_reports_a_deleted_rule_and_a_wrong_mode() {
        let (b, r) = (Fake::with_builtins(), FakeRoutes::default());
        let node = Node { backend: &b, routing: &r };
        let p = pod("c1", &["10.0.0.2"], Mode::Tproxy);
        add(&node, &p).unwrap();
        let (f, rule) = p.rules().remove(0);
        b.delete_spec(f, rule.table, rule.chain, &rule.spec()).unwrap();
        let e = check(&node, &p).unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
        add(&node, &pod("c1", &["10.0.0.2"], Mode::Redirect)).unwrap();
        let e = check(&node, &p).unwrap_err();
        assert!(e.to_string().contains("unexpected"), "{e}");
    }

    #[test]
    fn auto_mode_needs_bridge_and_br_netfilter() {
        let ips: Vec<IpAddr> = vec!["10.0.0.2".parse().unwrap(), "fd00::2".parse().unwrap()];
        let bridged = FakeRoutes { bridged: true, ..Default::default() };
        let routed = FakeRoutes::default();
        let m = resolve_modes(CaptureSetting::Auto, &ips, &[], &bridged, |f| f == Family::V4).unwrap();
        assert_eq!(m.iter().map(|x| x.1).collect::<Vec<_>>(), vec![Mode::Redirect, Mode::Tproxy]);
        let m = resolve_modes(CaptureSetting::Auto, &ips, &[], &routed, |_| true).unwrap();
        assert!(m.iter().all(|x| x.1 == Mode::Tproxy));
        let m = resolve_modes(CaptureSetting::Redirect, &ips, &[], &routed, |_| false).unwrap();
        assert!(m.iter().all(|x| x.1 == Mode::Redirect));
    }
}
