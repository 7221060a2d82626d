//! Several long-running consumers of one group, fed by one producer: the
//! shape of a shared-queue (Pull→Pop) test. Each consumer prints one
//! `RECV id=.. reconsume=.. queue=.. body=..` line per delivery.
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::lab::{repo_root, wait_for};
use crate::netns::Netns;
use crate::peers::{peers_home, require_installed};
use crate::sdk::Sdk;

pub struct Consumer {
    pub name: String,
    pub sdk: Sdk,
    child: Option<Child>,
    out: PathBuf,
}

/// One delivery as a consumer printed it.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub consumer: String,
    pub reconsume: u32,
    pub body: String,
}

impl Consumer {
    /// Starts a consumer of `group` on `topic` for `seconds`, in `ns`.
    #[allow(clippy::too_many_arguments)]
    pub fn start(sdk: Sdk, name: &str, ns: &Netns, namesrv: SocketAddr, topic: &str, group: &str, seconds: u64, extra: &[&str], workdir: &Path) -> Result<Consumer> {
        let mut cmd = match sdk {
            Sdk::Python => {
                let mut c = ns.command(require_installed("venv/bin/python")?);
                c.arg(repo_root().join("tests/peers/clients/py_consumer.py"));
                c.args([&namesrv.to_string(), "--topic", topic, "--group", group, "--seconds", &seconds.to_string(), "--id", name]);
                c
            }
            Sdk::Rust => {
                let mut c = ns.command(require_installed("bin/rust_produce_consume")?);
                c.args([&namesrv.to_string(), "--topic", topic, "--group", group, "--mode", "consume", "--timeout", &seconds.to_string()]);
                c
            }
        };
        cmd.args(extra);
        let home = workdir.join(format!("home-{name}"));
        std::fs::create_dir_all(&home)?;
        let out = workdir.join(format!("consumer-{name}.out"));
        cmd.env("HOME", &home)
            .env("RMQ_PEERS_HOME", peers_home())
            .stdin(Stdio::null())
            .stdout(File::create(&out)?)
            .stderr(File::create(out.with_extension("err"))?);
        // Safety: prctl(PR_SET_PDEATHSIG) is async-signal-safe; it only makes the kernel
        // kill this consumer if the test process dies first.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().with_context(|| format!("start consumer {name}"))?;
        Ok(Consumer { name: name.into(), sdk, child: Some(child), out })
    }

    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    pub fn signal(&self, sig: Signal) -> Result<()> {
        kill(Pid::from_raw(self.pid().context("consumer not running")?), sig)?;
        Ok(())
    }

    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    /// Waits for the consumer's own deadline to pass and it to exit.
    pub fn wait(&mut self, limit: Duration) -> Result<()> {
        let Some(child) = self.child.as_mut() else { return Ok(()) };
        let r = wait_for(&format!("consumer {} to exit", self.name), limit, || Ok(child.try_wait()?));
        if r.is_err() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.child = None;
        r.map(|_| ())
    }

    pub fn deliveries(&self) -> Vec<Delivery> {
        self.output()
            .lines()
            .filter_map(|l| {
                let rest = l.strip_prefix("RECV ")?;
                let reconsume = rest.split_whitespace().find_map(|w| w.strip_prefix("reconsume="))?.parse().ok()?;
                let body = rest.split_once("body=")?.1.to_string();
                Some(Delivery { consumer: self.name.clone(), reconsume, body })
            })
            .collect()
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The bodies [`produce`] sends: `<prefix> i=<i>` for i in 0..n.
pub fn bodies_of(prefix: &str, n: usize) -> BTreeSet<String> {
    (0..n).map(|i| format!("{prefix} i={i}")).collect()
}

/// Every body these consumers received.
pub fn received<'a>(consumers: impl IntoIterator<Item = &'a Consumer>) -> BTreeSet<String> {
    consumers.into_iter().flat_map(|c| c.deliveries()).map(|d| d.body).collect()
}

/// Runs the producer driver; bodies are `<prefix> i=<i>`. Fails unless every send succeeded.
pub fn produce(ns: &Netns, namesrv: SocketAddr, topic: &str, n: usize, prefix: &str, workdir: &Path) -> Result<()> {
    let (sent, failed) = produce_counting(ns, namesrv, topic, n, prefix, 0.0, workdir)?;
    if failed > 0 {
        bail!("{failed} of {n} sends failed ({} acknowledged)", sent.len());
    }
    Ok(())
}

/// Like [`produce`], pacing sends `interval` seconds apart and tolerating failed sends:
/// returns the bodies the broker acknowledged and the number of failures.
pub fn produce_counting(ns: &Netns, namesrv: SocketAddr, topic: &str, n: usize, prefix: &str, interval: f64, workdir: &Path) -> Result<(BTreeSet<String>, usize)> {
    let out = ns
        .command(require_installed("venv/bin/python")?)
        .arg(repo_root().join("tests/peers/clients/py_producer.py"))
        .args([&namesrv.to_string(), "--topic", topic, "-n", &n.to_string(), "--prefix", prefix, "--interval", &interval.to_string()])
        .env("HOME", workdir)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let sent: BTreeSet<String> = text.lines().filter_map(|l| l.strip_prefix("SENT_OK ")).map(str::to_string).collect();
    let failed = text.lines().find_map(|l| l.strip_prefix("SENT ")).and_then(|l| l.split_whitespace().find_map(|w| w.strip_prefix("failed="))).and_then(|v| v.parse().ok());
    let failed = failed.with_context(|| format!("producer printed no summary: {text}\n{}", String::from_utf8_lossy(&out.stderr)))?;
    Ok((sent, failed))
}

/// Creates `topic` with `queues` read/write queues on the broker (from its own netns).
pub fn create_topic(brk: &Netns, broker: SocketAddr, topic: &str, queues: u32) -> Result<()> {
    let out = brk
        .command("python3")
        .arg(repo_root().join("tests/peers/tools/rmq_cli.py"))
        .args(["create-topic", &broker.to_string(), topic, &queues.to_string()])
        .output()?;
    if !out.status.success() {
        bail!("create-topic failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// SET_MESSAGE_REQUEST_MODE on `broker` (what `mqadmin setConsumeMode` sends): with `POP`,
/// RocketMQ-5-style push consumers of `group` (the Rust SDK in `--mode pop`) consume `topic`
/// there with POP_MESSAGE and acknowledge with (BATCH_)ACK_MESSAGE.
pub fn set_consume_mode(brk: &Netns, broker: SocketAddr, topic: &str, group: &str, mode: &str) -> Result<()> {
    let out = brk
        .command("python3")
        .arg(repo_root().join("tests/peers/tools/rmq_cli.py"))
        .args(["set-mode", &broker.to_string(), topic, group, mode])
        .output()?;
    if !out.status.success() {
        bail!("set-mode failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// What a group of consumers received of the bodies starting with `prefix`.
pub struct GroupReport {
    pub per_consumer: BTreeMap<String, usize>,
    pub unique: BTreeSet<String>,
    pub deliveries: usize,
}

impl GroupReport {
    pub fn new(consumers: &[Consumer], prefix: &str) -> GroupReport {
        let mut per_consumer = BTreeMap::new();
        let mut unique = BTreeSet::new();
        let mut deliveries = 0;
        for c in consumers {
            let ds: Vec<Delivery> = c.deliveries().into_iter().filter(|d| d.body.starts_with(prefix)).collect();
            per_consumer.insert(c.name.clone(), ds.len());
            deliveries += ds.len();
            unique.extend(ds.into_iter().map(|d| d.body));
        }
        GroupReport { per_consumer, unique, deliveries }
    }

    pub fn duplicates(&self) -> usize {
        self.deliveries - self.unique.len()
    }

    /// Jain's fairness index over per-consumer deliveries: 1 = perfectly even, 1/n = one consumer got all.
    pub fn fairness(&self) -> f64 {
        let x: Vec<f64> = self.per_consumer.values().map(|&v| v as f64).collect();
        let (s, s2) = (x.iter().sum::<f64>(), x.iter().map(|v| v * v).sum::<f64>());
        if s2 == 0.0 { 0.0 } else { s * s / (x.len() as f64 * s2) }
    }

    pub fn active(&self) -> usize {
        self.per_consumer.values().filter(|&&v| v > 0).count()
    }
}
