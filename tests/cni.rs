//! rmq-cni chained after Debian's real `ptp` and `bridge` plugins, driven exactly as a
//! container runtime drives a conflist, in the node netns of the lab.
//!
//! - ptp (routed veth): `captureMode: auto` picks TPROXY and the pod's SDK reaches the
//!   real broker through the agent; CHECK passes, then catches a rule deleted by hand;
//!   DEL removes exactly the pod's rules. The conflist comes from `rmq-cni install`.
//! - bridge with br_netfilter on: auto picks REDIRECT, and that works; forcing TPROXY
//!   there blackholes the SYN (the netlab finding), and turning br_netfilter off fixes it.
//! - 20 parallel ADDs, then mixed DEL/ADD: exactly one copy of the shared plumbing and
//!   one rule per pod address; golden rule set.
//! - fail closed: excluded namespaces pass through; a failing ADD rolls back everything.
rmq_e2e::sandboxed_test_binary!();

use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};

use rmq_e2e::agent::{Agent, AgentOptions};
use rmq_e2e::cni::{self, our_rules_in, veth_prev_result, CniRuntime, PodRef};
use rmq_e2e::lab::{repo_root, wait_for, Lab};
use rmq_e2e::peers::Peers;
use rmq_e2e::sdk::{self, Sdk, SdkOptions};

/// The pod's first IPv4 address from a CNI result.
fn pod_v4(result: &Value) -> Result<IpAddr> {
    result["ips"]
        .as_array()
        .context("result without ips")?
        .iter()
        .filter_map(|i| i["address"].as_str()?.split('/').next()?.parse::<IpAddr>().ok())
        .find(IpAddr::is_ipv4)
        .context("result without an IPv4 address")
}

fn rules_of(node_rules: &[String], container_id: &str) -> Vec<String> {
    let tag = format!("{}{container_id}", rmq_common::RULE_COMMENT_PREFIX);
    node_rules.iter().filter(|l| l.contains(&format!("--comment {tag} ")) || l.contains(&format!("--comment \"{tag}\""))).cloned().collect()
}

fn all_rules(lab: &Lab) -> Result<Vec<String>> {
    all_rules_in(lab, false)
}

fn all_rules_in(lab: &Lab, legacy: bool) -> Result<Vec<String>> {
    let mut v = our_rules_in(&lab.node(), false, legacy)?;
    v.extend(our_rules_in(&lab.node(), true, legacy)?.into_iter().map(|l| format!("v6 {l}")));
    Ok(v)
}

/// An SDK in the CNI pod produces and consumes; the agent's access log must show the
/// pod as source and the real name server as the original destination.
fn sdk_goes_through_agent(lab: &Lab, agent: &Agent, peers: &Peers, pod: IpAddr, topic: &str) -> Result<()> {
    let before = agent.log()?.lines.len();
    let run = sdk::run(Sdk::Python, &lab.cni_pod(), peers.namesrv(), &SdkOptions::push(topic, 5), lab.workdir())?;
    run.ensure_passed()?;
    let log = agent.log()?.after(before);
    log.ensure_requests("GET_ROUTEINFO_BY_TOPIC", pod, peers.namesrv(), 1)?;
    log.ensure_requests("SEND_MESSAGE", pod, peers.broker(), 5)?;
    log.ensure_requests("PULL_MESSAGE", pod, peers.broker(), 1)?;
    Ok(())
}

fn connect_from(lab: &Lab, to: SocketAddr, limit: Duration) -> std::io::Result<TcpStream> {
    lab.cni_pod().run(|| TcpStream::connect_timeout(&to, limit))
}

#[test]
fn ptp_pod_installed_by_rmq_cni_install_is_captured_checked_and_deleted() -> Result<()> {
    cni::require_debian_plugins()?;
    let lab = Lab::up("cptp")?;
    let peers = Peers::start(&lab)?;
    let agent = Agent::start(&lab, AgentOptions { capture: Some("auto".into()), ..Default::default() })?;
    let wd = lab.workdir();

    // The node's primary CNI config is a plain .conf; `rmq-cni install` turns it into a
    // conflist with our entry last and puts the binary next to the other plugins.
    let (bin_dir, conf_dir) = (wd.join("opt-cni-bin"), wd.join("net.d"));
    std::fs::create_dir_all(&conf_dir)?;
    let mut primary = cni::conflist("ptp", "10.200.11.0/24", "fd00:200:11::/64", wd, "auto")["plugins"][0].clone();
    primary["cniVersion"] = json!("1.0.0");
    primary["name"] = json!("podnet");
    std::fs::write(conf_dir.join("10-podnet.conf"), primary.to_string())?;
    let install = |verb: &str| -> Result<String> {
        let out = Command::new(cni::cni_binary()?)
            .args([verb, "--bin-dir"])
            .arg(&bin_dir)
            .arg("--conf-dir")
            .arg(&conf_dir)
            .args(["--log-file", &wd.join("rmq-cni.log").display().to_string()])
            .args(["--entry-json", &json!({"lockFile": wd.join("rmq-cni.lock")}).to_string()])
            .output()?;
        ensure!(out.status.success() && out.stdout.is_empty(), "rmq-cni {verb}: {:?}", out);
        Ok(String::from_utf8_lossy(&out.stderr).into_owned())
    };
    println!("{}", install("install")?.trim());
    ensure!(install("install")?.contains("already in place"), "a second install must change nothing");
    let listed: Value = serde_json::from_str(&std::fs::read_to_string(conf_dir.join("10-podnet.conflist"))?)?;
    ensure!(!conf_dir.join("10-podnet.conf").exists(), "the .conf was not replaced by the conflist");
    let types: Vec<&str> = listed["plugins"].as_array().unwrap().iter().filter_map(|p| p["type"].as_str()).collect();
    ensure!(types == ["ptp", "rmq-cni"], "conflist plugins {types:?}");

    let rt = CniRuntime::with_path(lab.node(), listed, &format!("{}:{}", cni::DEBIAN_CNI_DIR, bin_dir.display()))?;
    let pod = PodRef::new("ptp-1", &lab.cni_pod(), "default");
    let runs = rt.add(&pod)?;
    // A chained plugin hands the previous result on untouched.
    ensure!(runs[1].stdout == runs[0].json()?.to_string(), "rmq-cni changed prevResult:\n{}\n{}", runs[0].stdout, runs[1].stdout);
    let result = runs[1].json()?;
    let ip = pod_v4(&result)?;
    let mine = rules_of(&all_rules(&lab)?, "ptp-1");
    println!("ptp pod {ip}: {mine:#?}");
    ensure!(mine.len() == 2, "want one v4 and one v6 rule, got {mine:?}");
    ensure!(mine.iter().all(|l| l.contains("-j TPROXY") && l.contains("--on-port 15001")), "ptp must use TPROXY: {mine:?}");
    ensure!(mine[0].contains(&format!("-s {ip}/32")), "{mine:?}");

    sdk_goes_through_agent(&lab, &agent, &peers, ip, "CNI_PTP")?;
    rt.check(&pod, &result)?;

    // Someone deletes the rule by hand: CHECK says what is missing.
    let spec = mine[0].trim_start_matches("-t mangle -A ");
    lab.node().sh(&format!("iptables -w 5 -t mangle -D {spec}"))?;
    let bad = rt.check_plugin("rmq-cni", &pod, &result)?;
    ensure!(!bad.ok, "CHECK passed with the pod's v4 rule deleted");
    let err = bad.json()?;
    ensure!(err["code"] == 101 && err["msg"].as_str().unwrap_or("").contains("missing"), "CHECK error: {err}");
    println!("CHECK after manual delete: {}", err["msg"]);

    rt.del(&pod, Some(&result))?;
    ensure!(rules_of(&all_rules(&lab)?, "ptp-1").is_empty(), "DEL left rules behind");
    rt.del(&pod, Some(&result))?; // idempotent
    // Shared plumbing stays for the next pod.
    ensure!(all_rules(&lab)?.iter().any(|l| l.contains("--transparent")), "DEL removed the shared socket rule");

    println!("{}", install("uninstall")?.trim());
    ensure!(conf_dir.join("10-podnet.conf").exists() && !conf_dir.join("10-podnet.conflist").exists(), "uninstall did not restore the .conf");
    ensure!(!bin_dir.join("rmq-cni").exists(), "uninstall left the binary");
    Ok(())
}

#[test]
fn bridge_pod_with_br_netfilter_is_captured_by_redirect() -> Result<()> {
    cni::require_debian_plugins()?;
    let lab = Lab::up("cbr")?;
    let peers = Peers::start(&lab)?;
    let agent = Agent::start(&lab, AgentOptions { capture: Some("auto".into()), ..Default::default() })?;
    let node = lab.node();
    // Kubernetes nodes run with br_netfilter on; be explicit (it is per netns here).
    node.sh("sysctl -qw net.bridge.bridge-nf-call-iptables=1 net.bridge.bridge-nf-call-ip6tables=1")?;
    let wd = lab.workdir();

    let rt = CniRuntime::new(node.clone(), cni::conflist("bridge", "10.200.10.0/24", "fd00:200:10::/64", wd, "auto"))?;
    let pod = PodRef::new("br-1", &lab.cni_pod(), "default");
    let runs = rt.add(&pod)?;
    ensure!(runs[1].stdout == runs[0].json()?.to_string(), "rmq-cni changed prevResult");
    let result = runs[1].json()?;
    let ip = pod_v4(&result)?;
    let mine = rules_of(&all_rules(&lab)?, "br-1");
    println!("bridge pod {ip} (auto): {mine:#?}");
    ensure!(mine.len() == 2 && mine.iter().all(|l| l.contains("-j REDIRECT --to-ports 15001")), "auto on a br_netfilter bridge must REDIRECT: {mine:?}");
    sdk_goes_through_agent(&lab, &agent, &peers, ip, "CNI_BRIDGE")?;
    rt.check(&pod, &result)?;
    rt.del(&pod, Some(&result))?;
    ensure!(rules_of(&all_rules(&lab)?, "br-1").is_empty(), "DEL left rules behind");

    // Why: the same pod with TPROXY forced. br_netfilter eats the diverted SYN.
    let forced = CniRuntime::new(node.clone(), cni::conflist("bridge", "10.200.10.0/24", "fd00:200:10::/64", wd, "tproxy"))?;
    let pod = PodRef::new("br-2", &lab.cni_pod(), "default");
    let result = forced.add(&pod)?.pop().context("no result")?.json()?;
    ensure!(rules_of(&all_rules(&lab)?, "br-2").iter().all(|l| l.contains("-j TPROXY")), "forced tproxy");
    let accepted = agent.metrics()?.get("rmq_agent_connections_total", &[]);
    let t = Instant::now();
    let e = connect_from(&lab, peers.namesrv(), Duration::from_secs(3));
    ensure!(e.is_err(), "TPROXY through a br_netfilter bridge connected; the auto rule is then unnecessary");
    println!("bridge + br_netfilter + TPROXY: connect failed after {:?}: {:?}", t.elapsed(), e.err());
    node.sh("sysctl -qw net.bridge.bridge-nf-call-iptables=0")?;
    connect_from(&lab, peers.namesrv(), Duration::from_secs(3)).context("TPROXY with br_netfilter off")?;
    // The counter moves when the agent has finished with the connection.
    let after = wait_for("the agent to count the TPROXYed connection", Duration::from_secs(5), || {
        let n = agent.metrics()?.get("rmq_agent_connections_total", &[]);
        Ok((n > accepted).then_some(n))
    })?;
    println!("with bridge-nf-call-iptables=0 TPROXY works (agent connections {accepted} -> {after})");
    forced.del(&pod, Some(&result))?;
    Ok(())
}

fn parallel<T: Send>(n: usize, f: impl Fn(usize) -> Result<T> + Sync) -> Result<Vec<T>> {
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..n).map(|i| { let f = &f; s.spawn(move || f(i)) }).collect();
        handles.into_iter().map(|h| h.join().map_err(|_| anyhow::anyhow!("thread panicked"))?).collect()
    })
}

fn veth_pod(lab: &Lab, i: usize) -> Value {
    let v4 = format!("10.201.0.{}/24", i + 2);
    let v6 = format!("fd00:201::{:x}/64", i + 2);
    veth_prev_result("pod0", &lab.cni_pod().path(), &[&v4, &v6])
}

fn run_ok(lab: &Lab, entry: &Value, cmd: &str, id: &str, prev: &Value) -> Result<()> {
    let r = cni::exec_rmq_cni(&lab.node(), entry, cmd, id, "default", prev)?;
    ensure!(r.ok, "{cmd} {id}: {} {}", r.stdout, r.stderr);
    Ok(())
}

/// Every shared rule exactly once, one rule per pod address, one policy rule per family.
fn ensure_consistent(lab: &Lab, legacy: bool, pods: &[usize]) -> Result<()> {
    let rules = all_rules_in(lab, legacy)?;
    let shared: Vec<&String> = rules.iter().filter(|l| !l.contains("--comment")).collect();
    let mut uniq = shared.clone();
    uniq.sort();
    uniq.dedup();
    ensure!(uniq.len() == shared.len(), "duplicated shared rules: {shared:#?}");
    ensure!(shared.len() == 2 * 5, "want 5 shared rules per family, got {shared:#?}");
    let per_pod = rules.iter().filter(|l| l.contains("--comment")).count();
    ensure!(per_pod == 2 * pods.len(), "want {} pod rules, got {per_pod}", 2 * pods.len());
    for i in pods {
        ensure!(rules_of(&rules, &format!("par-{i}")).len() == 2, "pod par-{i} does not have exactly 2 rules");
    }
    for fam in ["-4", "-6"] {
        let n = lab.node().sh(&format!("ip {fam} rule show"))?.lines().filter(|l| l.contains(&format!("lookup {}", rmq_common::ROUTE_TABLE))).count();
        ensure!(n == 1, "ip {fam} rule: {n} rules for table {}", rmq_common::ROUTE_TABLE);
    }
    // Never both backends: the other one holds none of our rules.
    ensure!(all_rules_in(lab, !legacy)?.iter().all(|l| !l.contains("RMQ_AGENT")), "rules leaked into the other iptables backend");
    Ok(())
}

/// 20 ADDs at once, CHECKs, mixed DEL/re-ADD, DELs; with `legacy`, the plugin is told to use
/// iptables-legacy while a kube-proxy-like writer changes the same tables through the
/// xtables lock the whole time.
fn parallel_case(prefix: &str, legacy: bool) -> Result<()> {
    let lab = Lab::up(prefix)?;
    let mut entry = cni::rmq_entry(lab.workdir(), "auto");
    if legacy {
        entry["iptablesBackend"] = json!("legacy");
    }

    if !legacy {
        // Golden: one pod's complete rule set, as the kernel lists it.
        run_ok(&lab, &entry, "ADD", "golden", &veth_prev_result("pod0", &lab.cni_pod().path(), &["10.201.1.2/24", "fd00:201:1::2/64"]))?;
        let mut got = all_rules(&lab)?.join("\n");
        got.push('\n');
        for fam in ["-4", "-6"] {
            got.push_str(&lab.node().sh(&format!("ip {fam} rule show table {0}; ip {fam} route show table {0}", rmq_common::ROUTE_TABLE))?);
        }
        golden("cni_rules.txt", &got)?;
        run_ok(&lab, &entry, "DEL", "golden", &json!({}))?;
    }

    let stop = std::sync::atomic::AtomicBool::new(false);
    let writes = std::thread::scope(|s| -> Result<usize> {
        let writer = s.spawn(|| -> Result<usize> {
            let mut n = 0;
            while legacy && !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // What kube-proxy does all day: rewrite its own rules, holding the xtables lock.
                lab.node().sh("iptables-legacy -w 10 -t mangle -A FORWARD -m comment --comment kube-proxy-like -j RETURN && \
                               iptables-legacy -w 10 -t mangle -D FORWARD -m comment --comment kube-proxy-like -j RETURN")?;
                n += 1;
            }
            Ok(n)
        });
        let run = || -> Result<()> {
            let t = Instant::now();
            parallel(20, |i| run_ok(&lab, &entry, "ADD", &format!("par-{i}"), &veth_pod(&lab, i)))?;
            println!("{prefix}: 20 parallel ADDs in {:?}", t.elapsed());
            ensure_consistent(&lab, legacy, &(0..20).collect::<Vec<_>>())?;
            parallel(20, |i| run_ok(&lab, &entry, "CHECK", &format!("par-{i}"), &veth_pod(&lab, i)))?;
            // Mixed: the even pods go away while the odd ones are re-added (a retried ADD).
            parallel(20, |i| run_ok(&lab, &entry, if i % 2 == 0 { "DEL" } else { "ADD" }, &format!("par-{i}"), &veth_pod(&lab, i)))?;
            ensure_consistent(&lab, legacy, &(0..20).filter(|i| i % 2 == 1).collect::<Vec<_>>())?;
            parallel(20, |i| run_ok(&lab, &entry, "DEL", &format!("par-{i}"), &veth_pod(&lab, i)))?;
            ensure_consistent(&lab, legacy, &[])
        };
        let r = run();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let n = writer.join().map_err(|_| anyhow::anyhow!("writer panicked"))??;
        r.map(|()| n)
    })?;
    if legacy {
        println!("{prefix}: the concurrent writer made {writes} lock-holding changes, none failed");
        ensure!(writes > 0, "the concurrent writer never ran");
    }
    Ok(())
}

#[test]
fn twenty_parallel_adds_and_dels_keep_one_consistent_rule_set() -> Result<()> {
    parallel_case("cpar", false)
}

#[test]
fn legacy_backend_with_a_concurrent_xtables_writer() -> Result<()> {
    parallel_case("cleg", true)
}

#[test]
fn excluded_namespaces_pass_through_stale_rules_go_and_a_failed_add_leaves_nothing() -> Result<()> {
    let lab = Lab::up("cfail")?;
    let entry = cni::rmq_entry(lab.workdir(), "auto");
    let prev = veth_pod(&lab, 0);
    for ns in ["kube-system", "rmq-system"] {
        let r = cni::exec_rmq_cni(&lab.node(), &entry, "ADD", "sys-1", ns, &prev)?;
        ensure!(r.ok && serde_json::from_str::<Value>(&r.stdout)? == prev, "ADD in {ns}: {}", r.stdout);
    }
    ensure!(all_rules(&lab)?.is_empty(), "excluded pods got rules: {:?}", all_rules(&lab)?);


    // A node without IPv6 on lo cannot hold the v6 local route: the dual-stack ADD fails
    // at its very last step and must undo everything before it.
    lab.node().sh("sysctl -qw net.ipv6.conf.lo.disable_ipv6=1")?;
    let r = cni::exec_rmq_cni(&lab.node(), &entry, "ADD", "fail-1", "default", &prev)?;
    ensure!(!r.ok, "ADD succeeded without an IPv6 local route");
    let err: Value = serde_json::from_str(&r.stdout).context("CNI error JSON on stdout")?;
    println!("failed ADD: {err}");
    ensure!(err["code"] == 100 && err["msg"].as_str().unwrap_or("").contains("policy routing"), "error: {err}");
    ensure!(all_rules(&lab)?.is_empty(), "rollback left rules: {:#?}", all_rules(&lab)?);
    for fam in ["-4", "-6"] {
        let rules = lab.node().sh(&format!("ip {fam} rule show; ip {fam} route show table all"))?;
        ensure!(!rules.contains(&format!("lookup {}", rmq_common::ROUTE_TABLE)) && !rules.contains(&format!("table {}", rmq_common::ROUTE_TABLE)), "rollback left routing:\n{rules}");
    }
    let log = std::fs::read_to_string(lab.workdir().join("rmq-cni.log"))?;
    ensure!(log.contains("rolling back"), "no rollback in the plugin log:\n{log}");
    lab.node().sh("sysctl -qw net.ipv6.conf.lo.disable_ipv6=0")?;

    // A captured pod's DEL never ran, and its IP now belongs to a kube-system pod: the
    // stale rule must not capture the newcomer.
    run_ok(&lab, &entry, "ADD", "gone-1", &prev)?;
    ensure!(rules_of(&all_rules(&lab)?, "gone-1").len() == 2, "setup: gone-1 has no rules");
    let r = cni::exec_rmq_cni(&lab.node(), &entry, "ADD", "sys-2", "kube-system", &prev)?;
    ensure!(r.ok, "ADD of the kube-system pod: {}", r.stdout);
    ensure!(all_rules(&lab)?.iter().all(|l| !l.contains("--comment")), "a stale rule still captures the reused IP: {:#?}", all_rules(&lab)?);
    // And for a captured newcomer, only its own rules remain.
    run_ok(&lab, &entry, "ADD", "gone-2", &prev)?;
    run_ok(&lab, &entry, "ADD", "new-3", &prev)?;
    let rules = all_rules(&lab)?;
    ensure!(rules_of(&rules, "gone-2").is_empty() && rules_of(&rules, "new-3").len() == 2, "after IP reuse: {rules:#?}");
    run_ok(&lab, &entry, "DEL", "new-3", &prev)?;
    let log = std::fs::read_to_string(lab.workdir().join("rmq-cni.log"))?;
    ensure!(log.contains("stale rule"), "no stale-rule line in the plugin log:\n{log}");
    Ok(())
}

/// Compares with `tests/golden/<name>`; `RMQ_UPDATE_GOLDEN=1` rewrites it.
fn golden(name: &str, got: &str) -> Result<()> {
    let path = repo_root().join("tests/golden").join(name);
    if std::env::var_os("RMQ_UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().unwrap_or(Path::new(".")))?;
        std::fs::write(&path, got)?;
    }
    let want = std::fs::read_to_string(&path).with_context(|| format!("read {} (RMQ_UPDATE_GOLDEN=1 creates it)", path.display()))?;
    if want != got {
        bail!("{} differs from the installed rules:\n--- want\n{want}\n--- got\n{got}", path.display());
    }
    Ok(())
}
