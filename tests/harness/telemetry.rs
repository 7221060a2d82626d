//! Reading what the agent reports: its JSON log lines (access log, refusals, codec
//! errors; see CONTRACTS.md) and its Prometheus metrics.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// Log messages from CONTRACTS.md.
pub const MSG_REQUEST: &str = "request";
pub const MSG_CONNECTION_CLOSED: &str = "connection closed";
pub const MSG_REFUSED: &str = "refused connection";
pub const MSG_MALFORMED: &str = "malformed frame, closing connection";

/// One JSON log line (tracing-subscriber json: `{"level":..,"fields":{"message":..,..},..}`).
#[derive(Clone)]
pub struct LogLine(pub Value);

impl LogLine {
    fn fields(&self) -> &Value {
        match self.0.get("fields") {
            Some(f) => f,
            None => &self.0, // flattened events
        }
    }

    pub fn message(&self) -> &str {
        self.fields().get("message").and_then(Value::as_str).unwrap_or("")
    }

    pub fn level(&self) -> &str {
        self.0.get("level").and_then(Value::as_str).unwrap_or("")
    }

    /// A field rendered as text (strings unquoted, numbers and bools as written).
    pub fn field(&self, name: &str) -> Option<String> {
        match self.fields().get(name)? {
            Value::String(s) => Some(s.clone()),
            Value::Null => None,
            v => Some(v.to_string()),
        }
    }

    /// A field holding an address (`ip`, `ip:port` or `[ip6]:port`), as its IP.
    pub fn field_ip(&self, name: &str) -> Option<IpAddr> {
        parse_ip(&self.field(name)?)
    }

    /// A field holding `ip:port`.
    pub fn field_addr(&self, name: &str) -> Option<SocketAddr> {
        self.field(name)?.parse().ok()
    }

    pub fn is(&self, message: &str) -> bool {
        self.message() == message
    }
}

impl fmt::Debug for LogLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

pub fn parse_ip(s: &str) -> Option<IpAddr> {
    s.parse::<SocketAddr>().map(|a| a.ip()).ok().or_else(|| s.trim_matches(|c| c == '[' || c == ']').parse().ok())
}

/// All lines of an agent log file; lines that are not JSON are kept apart.
pub struct AgentLog {
    pub lines: Vec<LogLine>,
    pub non_json: Vec<String>,
}

impl AgentLog {
    pub fn read(path: &Path) -> Result<AgentLog> {
        let text = std::fs::read_to_string(path).with_context(|| format!("read agent log {}", path.display()))?;
        Ok(Self::parse(&text))
    }

    pub fn parse(text: &str) -> AgentLog {
        let mut lines = Vec::new();
        let mut non_json = Vec::new();
        for l in text.lines().filter(|l| !l.trim().is_empty()) {
            match serde_json::from_str::<Value>(l) {
                Ok(v) if v.is_object() => lines.push(LogLine(v)),
                _ => non_json.push(l.to_string()),
            }
        }
        AgentLog { lines, non_json }
    }

    /// Only the lines after the first `n` (e.g. what one client run produced).
    pub fn after(&self, n: usize) -> AgentLog {
        AgentLog { lines: self.lines.iter().skip(n).cloned().collect(), non_json: self.non_json.clone() }
    }

    /// Fails unless at least `min` "request" lines for `code_name` went from `pod` to
    /// `orig_dst`; returns how many there were.
    pub fn ensure_requests(&self, code_name: &str, pod: IpAddr, orig_dst: SocketAddr, min: usize) -> Result<usize> {
        let n = self
            .requests(code_name)
            .filter(|l| l.field_ip("pod") == Some(pod) && l.field_addr("orig_dst") == Some(orig_dst))
            .count();
        if n < min {
            bail!(
                "expected >= {min} access-log lines {code_name} pod={pod} orig_dst={orig_dst}, found {n}; \
                 requests seen: {:#?}",
                self.request_summary()
            );
        }
        Ok(n)
    }

    pub fn with_message<'a>(&'a self, message: &'a str) -> impl Iterator<Item = &'a LogLine> + 'a {
        self.lines.iter().filter(move |l| l.is(message))
    }

    /// Access-log entries ("request") for a request code name, e.g. "PULL_MESSAGE".
    pub fn requests<'a>(&'a self, code_name: &'a str) -> impl Iterator<Item = &'a LogLine> + 'a {
        self.with_message(MSG_REQUEST).filter(move |l| l.field("code_name").as_deref() == Some(code_name))
    }

    /// A compact multi-line rendering of the last `n` lines, for failure messages.
    pub fn tail(&self, n: usize) -> String {
        let skip = self.lines.len().saturating_sub(n);
        let mut s: String = self.lines[skip..].iter().map(|l| format!("  {}\n", l.0)).collect();
        for l in self.non_json.iter().rev().take(5) {
            s.push_str(&format!("  (not JSON) {l}\n"));
        }
        s
    }

    /// The set of "code_name" values seen in "request" lines, for failure messages.
    pub fn request_summary(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for l in self.with_message(MSG_REQUEST) {
            let key = format!(
                "{}({}) dir={} orig_dst={}",
                l.field("code_name").unwrap_or_default(),
                l.field("code").unwrap_or_default(),
                l.field("dir").unwrap_or_default(),
                l.field("orig_dst").unwrap_or_default()
            );
            *m.entry(key).or_insert(0) += 1;
        }
        m
    }
}

/// One Prometheus sample.
#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed `/metrics` page (Prometheus / OpenMetrics text).
#[derive(Debug, Clone)]
pub struct Metrics {
    pub samples: Vec<Sample>,
    pub text: String,
}

impl Metrics {
    pub fn parse(text: &str) -> Result<Metrics> {
        let mut samples = Vec::new();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
            samples.push(parse_sample(line).with_context(|| format!("bad metrics line {line:?}"))?);
        }
        Ok(Metrics { samples, text: text.to_string() })
    }

    /// Sum of the samples named `name` whose labels include every pair in `labels`;
    /// 0 when there is none (a counter that never moved may be absent).
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name && labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v)))
            .map(|s| s.value)
            .sum::<f64>()
            + 0.0 // an empty f64 sum is -0.0
    }

    pub fn named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| s.name == name)
    }
}

fn parse_sample(line: &str) -> Result<Sample> {
    let (name, rest) = match line.find(['{', ' ']) {
        Some(i) => line.split_at(i),
        None => bail!("no value"),
    };
    let mut labels = BTreeMap::new();
    let rest = if let Some(body) = rest.strip_prefix('{') {
        let mut chars = body.char_indices().peekable();
        let mut end = None;
        loop {
            // key
            while matches!(chars.peek(), Some((_, ' ' | ','))) {
                chars.next();
            }
            match chars.peek() {
                Some((i, '}')) => {
                    end = Some(*i);
                    break;
                }
                None => break,
                _ => {}
            }
            let mut key = String::new();
            for (_, c) in chars.by_ref() {
                if c == '=' {
                    break;
                }
                key.push(c);
            }
            if chars.next().map(|(_, c)| c) != Some('"') {
                bail!("label {key} has no quoted value");
            }
            let mut val = String::new();
            while let Some((_, c)) = chars.next() {
                match c {
                    '\\' => match chars.next() {
                        Some((_, 'n')) => val.push('\n'),
                        Some((_, c)) => val.push(c),
                        None => break,
                    },
                    '"' => break,
                    c => val.push(c),
                }
            }
            labels.insert(key.trim().to_string(), val);
        }
        let end = end.context("unterminated label set")?;
        &body[end + 1..]
    } else {
        rest
    };
    let value_text = rest.split_whitespace().next().context("no value")?;
    let value = match value_text {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().with_context(|| format!("value {v:?}"))?,
    };
    Ok(Sample { name: name.to_string(), labels, value })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_prometheus_client_output() {
        let m = Metrics::parse(
            "# HELP x y\n# TYPE rmq_agent_connections_total counter\n\
             rmq_agent_connections_total{result=\"proxied\"} 3\n\
             rmq_agent_frame_errors_total{kind=\"bad \\\"json\\\"\",side=\"client\"} 1\n\
             rmq_agent_connections_active 2\n# EOF\n",
        )
        .unwrap();
        assert_eq!(m.get("rmq_agent_connections_total", &[("result", "proxied")]), 3.0);
        assert_eq!(m.get("rmq_agent_frame_errors_total", &[("kind", "bad \"json\"")]), 1.0);
        assert_eq!(m.get("rmq_agent_connections_active", &[]), 2.0);
        assert_eq!(m.get("rmq_agent_connections_total", &[("result", "refused_port")]), 0.0);
    }

    #[test]
    fn parses_tracing_json_lines() {
        let log = AgentLog::parse(
            "{\"level\":\"INFO\",\"fields\":{\"message\":\"request\",\"pod\":\"10.200.1.2:4000\",\
             \"orig_dst\":\"[fd00:200:2::2]:9876\",\"code\":105,\"code_name\":\"GET_ROUTEINFO_BY_TOPIC\"}}\nplain\n",
        );
        let l = log.requests("GET_ROUTEINFO_BY_TOPIC").next().unwrap();
        assert_eq!(l.field("code").as_deref(), Some("105"));
        assert_eq!(l.field_ip("pod"), Some("10.200.1.2".parse().unwrap()));
        assert_eq!(l.field_addr("orig_dst"), Some("[fd00:200:2::2]:9876".parse().unwrap()));
        assert_eq!(log.non_json, vec!["plain"]);
    }
}
