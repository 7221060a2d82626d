//! A packet capture of RocketMQ traffic inside one lab netns (tcpdump), decoded with
//! `tests/peers/tools/rmq_pcap.py`: what the broker really received and answered,
//! independent of the agent's own counters.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::lab::{repo_root, wait_for};
use crate::netns::Netns;

pub struct Tcpdump {
    child: Option<Child>,
    pcap: PathBuf,
    port: u16,
}

/// Request and response counts seen on the wire.
#[derive(Debug, Default)]
pub struct Wire {
    /// Requests by code.
    pub requests: BTreeMap<i64, u64>,
    /// Responses by (request code, response code).
    pub responses: BTreeMap<(i64, i64), u64>,
    /// Messages acknowledged by BATCH_ACK_MESSAGE requests the broker answered 0.
    pub batch_acked_messages: u64,
}

impl Wire {
    pub fn requests(&self, code: i64) -> u64 {
        self.requests.get(&code).copied().unwrap_or(0)
    }

    pub fn responses(&self, request_code: i64, response_code: i64) -> u64 {
        self.responses.get(&(request_code, response_code)).copied().unwrap_or(0)
    }
}

impl Tcpdump {
    /// Captures TCP port `port` on `iface` inside `ns` into `pcap`; returns once tcpdump listens.
    pub fn start(ns: &Netns, iface: &str, port: u16, pcap: PathBuf) -> Result<Tcpdump> {
        let log = pcap.with_extension("log");
        let child = ns
            .command("tcpdump")
            .args(["-i", iface, "-s", "0", "-U", "-B", "16384", "-w"])
            .arg(&pcap)
            .args(["tcp", "port", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("start tcpdump")?;
        let t = Tcpdump { child: Some(child), pcap, port };
        wait_for("tcpdump to listen", Duration::from_secs(10), || Ok(std::fs::read_to_string(&log)?.contains("listening on").then_some(())))?;
        Ok(t)
    }

    /// Stops the capture (SIGINT flushes it) and decodes every frame in it.
    pub fn stop(mut self) -> Result<Wire> {
        if let Some(mut c) = self.child.take() {
            kill(Pid::from_raw(c.id() as i32), Signal::SIGINT)?;
            c.wait()?;
        }
        let out = std::process::Command::new("python3")
            .arg(repo_root().join("tests/peers/tools/rmq_pcap.py"))
            .arg(&self.pcap)
            .args(["--ports", &self.port.to_string()])
            .output()
            .context("run rmq_pcap.py")?;
        ensure!(out.status.success(), "rmq_pcap.py failed: {}", String::from_utf8_lossy(&out.stderr));
        Ok(parse_summary(&String::from_utf8_lossy(&out.stdout)))
    }
}

impl Drop for Tcpdump {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Reads rmq_pcap.py's REQUESTS / RESPONSES summary lines.
fn parse_summary(text: &str) -> Wire {
    let mut w = Wire::default();
    let field = |l: &str, k: &str| l.split_whitespace().find_map(|x| x.strip_prefix(k)).and_then(|v| v.parse::<i64>().ok());
    let mut section = "";
    for l in text.lines() {
        if l.starts_with("REQUESTS") || l.starts_with("RESPONSES") || l.starts_with("BATCH_ACK") {
            section = if l.starts_with("REQUESTS") { "req" } else if l.starts_with("RESPONSES") { "resp" } else { "batch" };
            continue;
        }
        if section == "batch" && l.contains("batch_ack_acked") {
            w.batch_acked_messages += field(l, "messages=").unwrap_or(0) as u64;
            continue;
        }
        let Some(n) = field(l, "n=") else { continue };
        match section {
            "req" => {
                if let Some(c) = field(l, "code=") {
                    *w.requests.entry(c).or_default() += n as u64;
                }
            }
            "resp" => {
                if let (Some(rq), Some(rc)) = (field(l, "req="), field(l, "resp_code=")) {
                    *w.responses.entry((rq, rc)).or_default() += n as u64;
                }
            }
            _ => {}
        }
    }
    w
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_the_summary() {
        let w = super::parse_summary(
            "REQUESTS (server_port, ...) -> count\n  port=10911 code=200050  POP_MESSAGE  ser=JSON lang=JAVA ver=401  oneway=False n=7 \n  port=10911 code=200050  POP_MESSAGE  ser=JSON lang=JAVA ver=453  oneway=False n=2 \nRESPONSES (...)\n  port=10911 req=200051  ACK_MESSAGE   resp_code=0    n=5\n\
             BATCH_ACK MESSAGES (...)\n  port=10911 batch_ack_acked messages=40\n  port=10911 batch_ack_refused messages=3\n",
        );
        assert_eq!((w.requests(200050), w.responses(200051, 0), w.responses(200051, 1)), (9, 5, 0));
        assert_eq!(w.batch_acked_messages, 40);
    }
}
