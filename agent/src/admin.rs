//! Node-local admin. Two listeners, both unreachable from pods:
//! - `127.0.0.1:15020` (TCP): `/metrics`, `/healthz`, `/readyz` for probes and scrapers;
//! - a unix socket (root only): the same plus `/state` (JSON dump for
//!   `rmq-agent status`) and `/logging[?level=...]`.
//!
//! Runs on its own thread and runtime so a slow scrape never delays the data plane.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tracing::{debug, info, warn};

use crate::logging::LogLevelHandle;
use crate::metrics::Metrics;
use crate::state::{now_ms, ListenerView, PopState, Registry, StateDump};

/// Pull→Pop groups and the Pop-native ack-routing table size, read at dump time.
pub type PopView = Box<dyn Fn() -> PopState + Send + Sync>;

pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub registry: Arc<Registry>,
    pub log_level: Option<LogLevelHandle>,
    /// Listening, and (when configured) a name server answered recently.
    pub listening: AtomicBool,
    pub namesrv_ok: AtomicBool,
    pub draining: AtomicBool,
    pub generation: AtomicU64,
    pub started_ms: u64,
    pub listeners: std::sync::Mutex<Vec<ListenerView>>,
    /// Pull→Pop state for the dump, when conversion is on.
    pub converted: std::sync::OnceLock<PopView>,
    /// Closes both admin listeners (an agent that handed over must not answer probes
    /// that SO_REUSEPORT would otherwise share with its successor).
    pub stop: tokio::sync::Notify,
}

impl AdminState {
    pub fn new(metrics: Arc<Metrics>, registry: Arc<Registry>, log_level: Option<LogLevelHandle>) -> Self {
        AdminState {
            metrics,
            registry,
            log_level,
            listening: AtomicBool::new(false),
            namesrv_ok: AtomicBool::new(true),
            draining: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            started_ms: now_ms(),
            listeners: Default::default(),
            converted: Default::default(),
            stop: tokio::sync::Notify::new(),
        }
    }

    pub fn ready(&self) -> bool {
        self.listening.load(Ordering::Relaxed) && self.namesrv_ok.load(Ordering::Relaxed) && !self.draining.load(Ordering::Relaxed)
    }

    pub fn dump(&self) -> StateDump {
        let pop = self.converted.get().map(|f| f()).unwrap_or_default();
        StateDump {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            generation: self.generation.load(Ordering::Relaxed),
            started_unix_ms: self.started_ms,
            now_unix_ms: now_ms(),
            ready: self.ready(),
            draining: self.draining.load(Ordering::Relaxed),
            listeners: self.listeners.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            connections: self.registry.connections(),
            converted_groups: pop.groups,
            pop_ack_routes: pop.ack_routes,
            routes: pop.routes,
        }
    }
}

/// Binds both admin listeners now (so errors stop start-up) and serves them on a dedicated thread.
pub fn spawn(addr: SocketAddr, socket: &Path, state: Arc<AdminState>) -> anyhow::Result<()> {
    let tcp = bind_tcp(addr).with_context(|| format!("cannot bind the admin endpoint on {addr}; pick another --admin-addr"))?;
    let uds = bind_unix(socket)?;
    let socket = socket.to_path_buf();
    std::thread::Builder::new().name("rmq-admin".into()).spawn(move || {
        let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => return warn!(error = %e, "admin runtime failed to start; metrics and status are unavailable"),
        };
        rt.block_on(async move {
            let (tcp, uds) = match (TcpListener::from_std(tcp), UnixListener::from_std(uds)) {
                (Ok(t), Ok(u)) => (t, u),
                _ => return warn!("admin listeners could not be registered with the runtime"),
            };
            info!(addr = %addr, socket = %socket.display(), "admin endpoint listening");
            loop {
                tokio::select! {
                    _ = state.stop.notified() => return info!("admin endpoint closed"),
                    r = tcp.accept() => match r {
                        Ok((s, _)) => { tokio::spawn(serve(s, state.clone(), false)); }
                        Err(e) => { debug!(error = %e, "admin accept failed"); tokio::time::sleep(Duration::from_millis(50)).await; }
                    },
                    r = uds.accept() => match r {
                        Ok((s, _)) => { tokio::spawn(serve(s, state.clone(), true)); }
                        Err(e) => { debug!(error = %e, "admin socket accept failed"); tokio::time::sleep(Duration::from_millis(50)).await; }
                    },
                }
            }
        })
    })?;
    Ok(())
}

/// SO_REUSEPORT: during a hand-over the old and the new agent both serve
/// probes and scrapes until the old one exits.
fn bind_tcp(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.bind(&addr.into())?;
    s.listen(128)?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

/// Binds the admin socket, replacing a stale file, readable by root only.
fn bind_unix(path: &Path) -> anyhow::Result<std::os::unix::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}; set --admin-socket to a writable path", dir.display()))?;
    }
    // A predecessor that is handing over keeps serving its own (already
    // unlinked) socket; a fresh path is ours.
    let tmp: PathBuf = path.with_extension(format!("tmp{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let l = std::os::unix::net::UnixListener::bind(&tmp).with_context(|| format!("cannot bind the admin socket {}", tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot move the admin socket into place at {}", path.display()))?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// A minimal HTTP/1.x responder: one request per connection, then close.
async fn serve<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, state: Arc<AdminState>, privileged: bool) {
    let mut req = [0u8; 2048];
    let n = match tokio::time::timeout(Duration::from_secs(5), s.read(&mut req)).await {
        Ok(Ok(n)) => n,
        _ => return,
    };
    let line = std::str::from_utf8(&req[..n]).unwrap_or("").lines().next().unwrap_or("");
    let target = line.split_whitespace().nth(1).unwrap_or("");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let text = "text/plain; charset=utf-8";
    let (status, ctype, body) = match (path, privileged) {
        ("/metrics", _) => {
            // Refreshes the Pop gauges (pending receipts) before they are read.
            let _ = state.converted.get().map(|f| f());
            ("200 OK", "application/openmetrics-text; version=1.0.0; charset=utf-8", state.metrics.encode())
        }
        ("/healthz", _) => ("200 OK", text, "ok\n".to_string()),
        ("/readyz", _) if state.ready() => ("200 OK", text, "ready\n".to_string()),
        ("/readyz", _) => ("503 Service Unavailable", text, readiness_detail(&state)),
        ("/state", true) => match serde_json::to_string_pretty(&state.dump()) {
            Ok(j) => ("200 OK", "application/json", j + "\n"),
            Err(e) => ("500 Internal Server Error", text, format!("{e}\n")),
        },
        ("/logging", true) => logging(&state, query),
        ("/state" | "/logging", false) => ("403 Forbidden", text, "use the admin unix socket (rmq-agent status)\n".to_string()),
        _ => ("404 Not Found", text, "try /metrics, /healthz, /readyz, /state or /logging\n".to_string()),
    };
    let head = format!("HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
    let _ = s.write_all(head.as_bytes()).await;
    let _ = s.write_all(body.as_bytes()).await;
}

fn readiness_detail(state: &AdminState) -> String {
    let mut why = Vec::new();
    if !state.listening.load(Ordering::Relaxed) {
        why.push("capture listener not accepting yet");
    }
    if !state.namesrv_ok.load(Ordering::Relaxed) {
        why.push("no configured name server answered (--ready-namesrv)");
    }
    if state.draining.load(Ordering::Relaxed) {
        why.push("draining");
    }
    format!("not ready: {}\n", why.join("; "))
}

fn logging(state: &AdminState, query: &str) -> (&'static str, &'static str, String) {
    let text = "text/plain; charset=utf-8";
    let Some(handle) = &state.log_level else {
        return ("503 Service Unavailable", text, "log level is not adjustable in this process\n".into());
    };
    match query.strip_prefix("level=") {
        None => ("200 OK", text, format!("{}\n", handle.current())),
        Some(level) => match handle.set(&level.replace("%3D", "=").replace("%2C", ",")) {
            Ok(()) => {
                info!(level, "log level changed through the admin socket");
                ("200 OK", text, format!("{}\n", handle.current()))
            }
            Err(e) => ("400 Bad Request", text, format!("{e}\n")),
        },
    }
}
