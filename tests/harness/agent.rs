//! The agent under test: `rmq-agent run --capture tproxy --log-format json` in the
//! lab's node netns, its stderr (the JSON log) captured to a file.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::lab::{wait_for, Lab};
use crate::telemetry::{AgentLog, LogLine, Metrics};

pub use rmq_common::{ADMIN_PORT, AGENT_PORT};

/// Finds the agent binary built by cargo in the same profile as this test
/// (`target/<profile>/rmq-agent`, next to `target/<profile>/deps/<test>`), or
/// `$RMQ_AGENT_BIN`.
pub fn agent_binary() -> Result<PathBuf> {
    workspace_binary("rmq-agent", "RMQ_AGENT_BIN")
}

/// A workspace binary: `$<env_var>` if set, else `target/<profile>/<name>` of the
/// profile this test was built in.
pub fn workspace_binary(name: &str, env_var: &str) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(env_var) {
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!("{env_var}={} does not exist", p.display());
        }
        return Ok(p);
    }
    let exe = std::env::current_exe().context("locate the test executable")?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("the test executable is not in target/<profile>/deps")?;
    let bin = profile_dir.join(name);
    if !bin.is_file() {
        bail!(
            "{} is missing: build it first with `cargo build -p {name}` (same profile as the \
             tests; add --release for release tests), or set {env_var}",
            bin.display()
        );
    }
    Ok(bin)
}

#[derive(Clone, Debug, Default)]
pub struct AgentOptions {
    /// `--spoof-source`: upstream connections carry the pod's IP.
    pub spoof_source: bool,
    /// `--capture` (default `tproxy`; `auto` also accepts REDIRECTed connections).
    pub capture: Option<String>,
    /// More `rmq-agent run` arguments.
    pub extra_args: Vec<String>,
}

pub struct Agent<'lab> {
    lab: &'lab Lab,
    bin: PathBuf,
    options: AgentOptions,
    child: Option<Child>,
    log_path: PathBuf,
    /// Agents that handed over and are still finishing (see [`Agent::upgrade_no_wait`]).
    predecessors: Vec<Child>,
}

impl<'lab> Agent<'lab> {
    /// Starts the agent in the node netns and waits until both its capture listener
    /// (:15001) and its admin endpoint (:15020) accept.
    pub fn start(lab: &'lab Lab, options: AgentOptions) -> Result<Agent<'lab>> {
        let bin = agent_binary()?;
        let log_path = lab.workdir().join("agent.log");
        let mut agent = Agent { lab, bin, options, child: None, log_path, predecessors: Vec::new() };
        agent.spawn()?;
        Ok(agent)
    }

    /// Starts it again after [`Agent::stop`] (same options; the log file is appended to).
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.spawn()
    }

    /// Starts a second agent while this one runs and waits until the old one
    /// has handed over its listener and live connections and exited.
    pub fn upgrade(&mut self) -> Result<()> {
        let mut old = self.launch_successor()?;
        // It stays until the POPs it started come back (a long poll lasts up to 20 s).
        self.exit_or_kill(&mut old, "the old agent to hand over and exit", Duration::from_secs(45))?;
        self.successor_alive()
    }

    /// Starts the next agent while this one runs; returns the running one's process.
    fn launch_successor(&mut self) -> Result<Child> {
        let old = self.child.take().context("no agent is running to upgrade")?;
        self.child = Some(self.launch()?);
        Ok(old)
    }

    fn successor_alive(&mut self) -> Result<()> {
        if !self.is_running() {
            bail!("the new agent died during the hand-over; log:\n{}", self.log_text_tail(30));
        }
        Ok(())
    }

    /// Waits for `old` to exit on its own; SIGKILLs it if it has not after `timeout`.
    fn exit_or_kill(&self, old: &mut Child, what: &str, timeout: Duration) -> Result<std::process::ExitStatus> {
        let pid = old.id();
        wait_for(what, timeout, || Ok(old.try_wait()?)).map_err(|e| {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            let _ = old.wait();
            e.context(format!("agent pid {pid} was still running; log tail:\n{}", self.log_text_tail(30)))
        })
    }

    /// Like [`Agent::upgrade`], but returns once the old agent says the hand-over is
    /// complete, without waiting for it to exit (it may still be waiting for broker
    /// requests it started). See [`Agent::wait_predecessors`].
    pub fn upgrade_no_wait(&mut self) -> Result<()> {
        let done = |a: &Self| -> Result<usize> { Ok(a.log()?.lines.iter().filter(|l| l.is("hand-over complete")).count()) };
        let before = done(self)?;
        let old = self.launch_successor()?;
        self.predecessors.push(old);
        wait_for("the old agent to complete the hand-over", Duration::from_secs(20), || Ok((done(self)? > before).then_some(())))
            .with_context(|| format!("agent log tail:\n{}", self.log_text_tail(30)))?;
        self.successor_alive()
    }

    /// Sends `sig` to every agent left by [`Agent::upgrade_no_wait`].
    pub fn signal_predecessors(&self, sig: Signal) -> Result<()> {
        for old in &self.predecessors {
            kill(Pid::from_raw(old.id() as i32), sig)?;
        }
        Ok(())
    }

    /// Waits for every agent left by [`Agent::upgrade_no_wait`] to exit on its own.
    pub fn wait_predecessors(&mut self, timeout: Duration) -> Result<()> {
        for mut old in std::mem::take(&mut self.predecessors) {
            let status = self.exit_or_kill(&mut old, "an agent that handed over to exit", timeout)?;
            ensure!(status.success(), "agent pid {} exited with {status}", old.id());
        }
        Ok(())
    }

    /// Like [`Agent::upgrade`] for a predecessor started with `--idle-after-handover`:
    /// waits until it has handed over and says it idles, and returns its process,
    /// still running (the caller ends it).
    pub fn upgrade_keep_predecessor(&mut self) -> Result<Child> {
        let old = self.launch_successor()?;
        self.wait_log("the predecessor to hand over and idle", Duration::from_secs(45), |l| {
            l.is("handed over to a newer agent; idle until SIGTERM")
        })?;
        self.successor_alive()?;
        Ok(old)
    }

    /// `rmq-agent status -o json` against this agent's admin socket: the state dump.
    pub fn state(&self) -> Result<serde_json::Value> {
        let out = std::process::Command::new(&self.bin).args(["status", "-o", "json", "--socket"]).arg(self.admin_socket()).output()?;
        ensure!(out.status.success(), "rmq-agent status failed: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).context("rmq-agent status -o json printed no JSON")
    }

    /// SIGKILL: the agent dies with everything in flight (restart it with [`Agent::restart`]).
    pub fn kill(&mut self) -> Result<()> {
        let mut child = self.child.take().context("no agent is running")?;
        kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL)?;
        child.wait()?;
        Ok(())
    }

    /// Sends SIGTERM and returns at once (the agent drains in the background).
    pub fn terminate(&self) -> Result<()> {
        let child = self.child.as_ref().context("no agent is running")?;
        kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM)?;
        Ok(())
    }

    /// Waits for the agent to exit on its own; true if it did within `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<bool> {
        let Some(child) = self.child.as_mut() else { return Ok(true) };
        Ok(wait_for("the agent to exit", timeout, || Ok(child.try_wait()?)).is_ok())
    }

    /// This lab's hand-off socket (new agents find the running one here).
    pub fn handoff_socket(&self) -> PathBuf {
        self.lab.workdir().join("handoff.sock")
    }

    fn spawn(&mut self) -> Result<()> {
        let child = self.launch()?;
        self.child = Some(child);
        self.wait_listening()
    }

    fn launch(&mut self) -> Result<Child> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .with_context(|| format!("open {}", self.log_path.display()))?;
        let mut cmd = self.lab.node().command(&self.bin);
        cmd.args(["run", "--capture", self.options.capture.as_deref().unwrap_or("tproxy"), "--log-format", "json"]);
        // Unix sockets live on the shared filesystem, not in a netns: each lab gets its own.
        cmd.arg("--admin-socket").arg(self.admin_socket());
        cmd.arg("--handoff-socket").arg(self.handoff_socket());
        if self.options.spoof_source {
            cmd.arg("--spoof-source");
        }
        cmd.args(&self.options.extra_args);
        cmd.env("RMQ_AGENT_LOG", std::env::var("RMQ_AGENT_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // Safety: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory of
        // the parent; it makes the kernel SIGKILL the agent if the test process dies
        // without running Drop (e.g. killed on a timeout). `ip netns exec` execs the
        // agent in place, so the setting reaches the agent itself.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().with_context(|| format!("start {} in the node netns", self.bin.display()))?;
        std::fs::write(self.lab.workdir().join("agent.pid"), child.id().to_string())?;
        Ok(child)
    }

    fn wait_listening(&mut self) -> Result<()> {
        let ready = wait_for("the agent's listeners :15001 and :15020 (node netns)", Duration::from_secs(10), || {
            if let Some(status) = self.child.as_mut().unwrap().try_wait()? {
                bail!("rmq-agent exited during start-up ({status}); log:\n{}", self.log_text_tail(30));
            }
            let listening = self.lab.node().sh(&format!(
                "ss -Hltn '( sport = :{AGENT_PORT} or sport = :{ADMIN_PORT} )'"
            ))?;
            let ports_up = [AGENT_PORT, ADMIN_PORT]
                .iter()
                .all(|p| listening.lines().any(|l| l.contains(&format!(":{p} "))));
            Ok(ports_up.then_some(()))
        });
        if let Err(e) = ready {
            let _ = self.stop();
            return Err(e.context(format!("agent log: {}", self.log_path.display())));
        }
        Ok(())
    }

    /// This lab's agent admin socket (what `rmq-agent status --socket` reads).
    pub fn admin_socket(&self) -> PathBuf {
        self.lab.workdir().join("admin.sock")
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// SIGTERM by PID, SIGKILL after 5 s; idempotent.
    pub fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else { return Ok(()) };
        let pid = Pid::from_raw(child.id() as i32);
        if child.try_wait()?.is_none() {
            let _ = kill(pid, Signal::SIGTERM);
            let stopped = wait_for("the agent to exit after SIGTERM", Duration::from_secs(5), || {
                Ok(child.try_wait()?.map(|_| ()))
            });
            if stopped.is_err() {
                let _ = kill(pid, Signal::SIGKILL);
                child.wait()?;
                eprintln!("rmq-agent pid {pid} did not exit within 5 s of SIGTERM; killed");
            }
        }
        let _ = std::fs::remove_file(self.lab.workdir().join("agent.pid"));
        Ok(())
    }

    pub fn binary(&self) -> &Path {
        &self.bin
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Everything the agent has logged so far (JSON lines parsed).
    pub fn log(&self) -> Result<AgentLog> {
        AgentLog::read(&self.log_path)
    }

    fn log_text_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Waits until a log line satisfies `pred` (the agent logs asynchronously).
    pub fn wait_log(&self, what: &str, timeout: Duration, pred: impl Fn(&LogLine) -> bool) -> Result<LogLine> {
        wait_for(what, timeout, || Ok(self.log()?.lines.into_iter().find(|l| pred(l))))
            .with_context(|| format!("agent log tail:\n{}", self.log().map(|l| l.tail(15)).unwrap_or_default()))
    }

    /// GET http://127.0.0.1:15020/metrics from inside the node netns.
    pub fn metrics(&self) -> Result<Metrics> {
        let text = self.lab.node().run(|| -> Result<String> {
            let mut s = TcpStream::connect(("127.0.0.1", ADMIN_PORT)).context("connect to the admin endpoint")?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
            let mut resp = Vec::new();
            s.read_to_end(&mut resp)?;
            let resp = String::from_utf8(resp).context("metrics response is not UTF-8")?;
            let (head, body) = resp.split_once("\r\n\r\n").context("no HTTP header/body separator")?;
            if !head.starts_with("HTTP/1.") || head.split_whitespace().nth(1) != Some("200") {
                bail!("GET /metrics answered {}", head.lines().next().unwrap_or(""));
            }
            Ok(body.to_string())
        })?;
        Metrics::parse(&text)
    }
}

impl Drop for Agent<'_> {
    fn drop(&mut self) {
        for mut old in std::mem::take(&mut self.predecessors) {
            let _ = kill(Pid::from_raw(old.id() as i32), Signal::SIGKILL);
            let _ = old.wait();
        }
        if let Err(e) = self.stop() {
            eprintln!("stopping rmq-agent: {e:#}");
        }
    }
}
