//! Real SDK runs inside a lab netns: the Python SDK (PyPI `rocketmq` 0.4.4 =
//! rocketmq-client-cpp) via `tests/peers/clients/py_produce_consume.py`, and the Rust
//! SDK (rocketmq-client-rust 1.0.0) via the installed `rust_produce_consume` driver.
//! Both produce N messages and consume them back, then print
//! `mode=.. sent=N received=M unique=U` and `RESULT PASS|FAIL`. The Python driver
//! also compares every body (bytes) and key exactly: `verify exact=E/N mismatched=X`.
//! The Rust driver only counts distinct bodies carrying its run prefix.

use std::fs::File;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::frames::RemotingConn;
use crate::lab::{repo_root, wait_for};
use crate::netns::Netns;
use crate::peers::{peers_home, require_installed};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sdk {
    Python,
    Rust,
}

#[derive(Clone, Debug)]
pub struct SdkOptions {
    pub topic: String,
    pub group: Option<String>,
    pub messages: usize,
    /// "push" or "pull" (Python), "push" or "pop" (Rust).
    pub mode: String,
    /// The driver's own consume timeout (seconds).
    pub timeout_s: u64,
    /// Seconds between sends, for sustained load (Python driver only).
    pub send_interval_s: Option<f64>,
}

impl SdkOptions {
    pub fn push(topic: &str, messages: usize) -> SdkOptions {
        SdkOptions { topic: topic.into(), group: None, messages, mode: "push".into(), timeout_s: 60, send_interval_s: None }
    }
}

/// The outcome of one driver run.
#[derive(Debug)]
pub struct SdkRun {
    pub sdk: Sdk,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
    pub messages: usize,
}

impl SdkRun {
    /// The last `key=N` the driver printed.
    pub fn value(&self, key: &str) -> Option<usize> {
        self.stdout
            .lines()
            .rev()
            .flat_map(|l| l.split_whitespace())
            .find_map(|w| w.strip_prefix(&format!("{key}="))?.split('/').next()?.parse().ok())
    }

    pub fn sent(&self) -> Option<usize> {
        self.value("sent")
    }
    pub fn received(&self) -> Option<usize> {
        self.value("received")
    }
    pub fn unique(&self) -> Option<usize> {
        self.value("unique")
    }
    /// Python only: messages that came back with exactly the body and keys sent.
    pub fn exact(&self) -> Option<usize> {
        self.value("exact")
    }
    pub fn mismatched(&self) -> Option<usize> {
        self.value("mismatched")
    }
    pub fn passed(&self) -> bool {
        self.status.success() && self.stdout.lines().any(|l| l.trim() == "RESULT PASS")
    }

    /// The group/run the Rust driver printed (`group=rs_cg_<run>`).
    pub fn group(&self) -> Option<String> {
        self.stdout.split(|c: char| c.is_whitespace() || c == '(' || c == ')').find_map(|w| w.strip_prefix("group=")).map(str::to_string)
    }

    /// RESULT PASS, exit 0, every message sent and received (and, for Python, every
    /// body and key identical to what was sent).
    pub fn ensure_passed(&self) -> Result<()> {
        let n = self.messages;
        let ctx = || format!("{:?} SDK run ({:.1}s) output:\n{}\nstderr tail:\n{}", self.sdk, self.elapsed.as_secs_f64(), self.stdout.trim(), tail(&self.stderr, 15));
        ensure!(self.passed(), "the {:?} SDK did not pass. {}", self.sdk, ctx());
        ensure!(self.sent() == Some(n), "sent={:?}, want {n}. {}", self.sent(), ctx());
        ensure!(self.unique() == Some(n), "unique={:?}, want {n}. {}", self.unique(), ctx());
        if self.sdk == Sdk::Python {
            ensure!(self.exact() == Some(n), "exact={:?}, want {n}. {}", self.exact(), ctx());
            ensure!(self.mismatched() == Some(0), "mismatched={:?}. {}", self.mismatched(), ctx());
        }
        Ok(())
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Runs an SDK driver in `ns` against the name server `namesrv` (the clients take the
/// real address; the node's capture is what routes them through the agent).
pub fn run(sdk: Sdk, ns: &Netns, namesrv: SocketAddr, opts: &SdkOptions, workdir: &std::path::Path) -> Result<SdkRun> {
    let mut cmd = match sdk {
        Sdk::Python => {
            let py = require_installed("venv/bin/python")?;
            let mut c = ns.command(py);
            c.arg(repo_root().join("tests/peers/clients/py_produce_consume.py"));
            c
        }
        Sdk::Rust => ns.command(require_installed("bin/rust_produce_consume")?),
    };
    cmd.arg(namesrv.to_string())
        .args(["--topic", &opts.topic, "-n", &opts.messages.to_string(), "--mode", &opts.mode])
        .args(["--timeout", &opts.timeout_s.to_string()]);
    if let Some(g) = &opts.group {
        cmd.args(["--group", g]);
    }
    if let (Sdk::Python, Some(i)) = (sdk, opts.send_interval_s) {
        cmd.args(["--send-interval", &i.to_string()]);
    }
    // The C++ client writes its logs under $HOME/logs; keep them with the test.
    let home = workdir.join(format!("home-{sdk:?}"));
    std::fs::create_dir_all(&home)?;
    cmd.env("HOME", &home).env("RMQ_PEERS_HOME", peers_home());
    run_bounded(sdk, cmd, workdir, Duration::from_secs(opts.timeout_s + 60), opts.messages)
}

fn run_bounded(sdk: Sdk, mut cmd: Command, workdir: &std::path::Path, limit: Duration, messages: usize) -> Result<SdkRun> {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    let out_path: PathBuf = workdir.join(format!("sdk-{sdk:?}-{}.out", RUNS.fetch_add(1, Ordering::Relaxed)));
    let err_path = out_path.with_extension("err");
    cmd.stdin(Stdio::null()).stdout(File::create(&out_path)?).stderr(File::create(&err_path)?);
    // Safety: prctl(PR_SET_PDEATHSIG) is async-signal-safe and only affects the child;
    // it kills the SDK driver if the test process dies before it can clean up.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let t0 = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("start the {sdk:?} SDK driver"))?;
    let status = match wait_for(&format!("the {sdk:?} SDK driver to finish"), limit, || Ok(child.try_wait()?)) {
        Ok(s) => s,
        Err(e) => {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            let _ = child.wait();
            let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
            return Err(e.context(format!("killed the hung {sdk:?} SDK driver; its output so far:\n{stdout}")));
        }
    };
    Ok(SdkRun {
        sdk,
        status,
        stdout: std::fs::read_to_string(&out_path)?,
        stderr: std::fs::read_to_string(&err_path)?,
        elapsed: t0.elapsed(),
        messages,
    })
}

/// The Rust driver only counts distinct bodies carrying its run prefix; this checks what
/// it produced byte for byte: pull `topic` back (through the agent, from `pod`) and
/// compare every body ("run=<run> i=<i>") and key ("k<i>") with what the driver sends.
pub fn ensure_rust_messages_stored_exactly(pod: &Netns, namesrv: SocketAddr, broker: SocketAddr, topic: &str, run: &SdkRun) -> Result<()> {
    let group = run.group().context("the Rust driver printed no group=rs_cg_<run>")?;
    let run_id = group.strip_prefix("rs_cg_").context("unexpected Rust driver group name")?.to_string();
    let queues = RemotingConn::new(pod.run(|| TcpStream::connect(namesrv))?)?.read_queue_nums(topic)?;
    let mut conn = RemotingConn::new(pod.run(|| TcpStream::connect(broker))?)?;
    let prefix = format!("run={run_id} ");
    let mut got: Vec<(String, Option<String>)> = conn
        .pull_all(topic, "rmq_e2e_verify", queues)?
        .iter()
        .filter(|m| m.body.starts_with(prefix.as_bytes()))
        .map(|m| (String::from_utf8_lossy(&m.body).into_owned(), m.keys().map(str::to_string)))
        .collect();
    got.sort();
    let mut want: Vec<(String, Option<String>)> =
        (0..run.messages).map(|i| (format!("run={run_id} i={i}"), Some(format!("k{i}")))).collect();
    want.sort();
    ensure!(got == want, "stored Rust SDK messages differ from what it sent:\n got {got:?}\nwant {want:?}");
    Ok(())
}
