//! Node-local admin endpoint: `/metrics` (Prometheus), `/healthz`, `/readyz`.
//! Runs on its own thread and runtime so a slow scrape never delays the data plane.
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use crate::metrics::Metrics;

pub struct AdminState {
    pub metrics: Arc<Metrics>,
    /// Set once the capture listener is bound and accepting.
    pub ready: AtomicBool,
}

/// Binds the admin listener (loopback only; checked at config time) and serves it on a dedicated thread.
pub fn spawn(addr: SocketAddr, state: Arc<AdminState>) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let std_listener = std::net::TcpListener::bind(addr)
        .map_err(|e| anyhow::anyhow!("cannot bind the admin endpoint on {addr}: {e}; pick another --admin-addr"))?;
    std_listener.set_nonblocking(true)?;
    let handle = std::thread::Builder::new().name("rmq-admin".into()).spawn(move || {
        let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                warn!(error = %e, "admin runtime failed to start; metrics are unavailable");
                return;
            }
        };
        rt.block_on(async move {
            let listener = match TcpListener::from_std(std_listener) {
                Ok(l) => l,
                Err(e) => return warn!(error = %e, "admin listener failed"),
            };
            loop {
                match listener.accept().await {
                    Ok((s, _)) => {
                        tokio::spawn(handle(s, state.clone()));
                    }
                    Err(e) => {
                        debug!(error = %e, "admin accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        })
    })?;
    Ok(handle)
}

/// A minimal HTTP/1.x responder: one GET per connection, then close.
async fn handle(mut s: TcpStream, state: Arc<AdminState>) {
    let mut req = [0u8; 2048];
    let n = match tokio::time::timeout(Duration::from_secs(5), s.read(&mut req)).await {
        Ok(Ok(n)) => n,
        _ => return,
    };
    let line = std::str::from_utf8(&req[..n]).unwrap_or("").lines().next().unwrap_or("");
    let path = line.split_whitespace().nth(1).unwrap_or("");
    let (status, ctype, body) = match path {
        "/metrics" => ("200 OK", "application/openmetrics-text; version=1.0.0; charset=utf-8", state.metrics.encode()),
        "/healthz" => ("200 OK", "text/plain", "ok\n".to_string()),
        "/readyz" if state.ready.load(Ordering::Relaxed) => ("200 OK", "text/plain", "ready\n".to_string()),
        "/readyz" => ("503 Service Unavailable", "text/plain", "not ready\n".to_string()),
        _ => ("404 Not Found", "text/plain", "try /metrics, /healthz or /readyz\n".to_string()),
    };
    let head = format!("HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
    let _ = s.write_all(head.as_bytes()).await;
    let _ = s.write_all(body.as_bytes()).await;
}
