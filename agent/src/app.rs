//! Builds and runs the agent: a data-plane runtime for captured connections
//! and a separate admin thread; SIGTERM/SIGINT stop accepting and drain.
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{info, warn};

use crate::admin::{self, AdminState};
use crate::codec::Limits;
use crate::config::Config;
use crate::logging::LogLevelHandle;
use crate::metrics::Metrics;
use crate::policy::DestinationPolicy;
use crate::relay::{self, ProxyCtx};
use crate::socket::{CaptureMode, KernelSockets, SocketFactory};
use crate::state::{ListenerView, Registry};

pub fn run(cfg: Config, log_level: Option<LogLevelHandle>) -> anyhow::Result<()> {
    let workers = if cfg.workers == 0 { std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2) } else { cfg.workers };
    let metrics = Arc::new(Metrics::new());
    let registry = Arc::new(Registry::default());
    let admin = Arc::new(AdminState::new(metrics.clone(), registry.clone(), log_level));
    admin::spawn(cfg.admin_addr, &cfg.admin_socket, admin.clone())?;

    let sockets: Arc<dyn SocketFactory> = Arc::new(KernelSockets { mode: cfg.capture, mark: rmq_common::UPSTREAM_MARK, keepalive: Duration::from_secs(30) });
    let std_listener = sockets.listener(cfg.listen)?;
    admin.listeners.lock().unwrap_or_else(|p| p.into_inner()).push(ListenerView {
        addr: cfg.listen.to_string(),
        capture: format!("{:?}", cfg.capture).to_lowercase(),
        transparent: cfg.capture != CaptureMode::Redirect,
        inherited: false,
    });
    let ctx = Arc::new(ProxyCtx {
        sockets,
        policy: DestinationPolicy::new(cfg.ports.iter().copied(), cfg.allow_cidrs.clone(), cfg.listen.port()),
        metrics: metrics.clone(),
        limits: Limits { max_frame: cfg.max_frame, ..Limits::default() },
        connect_timeout: cfg.connect_timeout,
        spoof_source: cfg.spoof_source,
        access_log: cfg.access_log,
        registry,
    });

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name("rmq-data")
        .enable_all()
        .build()
        .context("cannot start the data-plane runtime")?;
    rt.block_on(async move {
        let listener = TcpListener::from_std(std_listener)?;
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        if !cfg.ready_namesrv.is_empty() {
            tokio::spawn(probe_name_servers(cfg.ready_namesrv.clone(), admin.clone()));
        }
        admin.listening.store(true, Ordering::Relaxed);
        info!(listen = %cfg.listen, capture = ?cfg.capture, spoof_source = cfg.spoof_source, ports = ?cfg.ports, workers, admin = %cfg.admin_addr, "rmq-agent listening");
        loop {
            tokio::select! {
                biased;
                _ = term.recv() => break,
                _ = int.recv() => break,
                r = listener.accept() => match r {
                    Ok((stream, peer)) => { tokio::spawn(relay::serve(ctx.clone(), stream, peer)); }
                    // Out of fds or memory: back off instead of spinning.
                    Err(e) => {
                        warn!(error = %e, "accept failed; raise the fd limit if this is EMFILE");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
        admin.draining.store(true, Ordering::Relaxed);
        drop(listener);
        let deadline = tokio::time::Instant::now() + cfg.drain_timeout;
        info!(active = metrics.connections_active.get(), "draining: stopped accepting, waiting for open connections");
        while metrics.connections_active.get() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        info!(left = metrics.connections_active.get(), "rmq-agent stopped");
        anyhow::Ok(())
    })?;
    // Connections still open after the drain deadline are closed by exit.
    rt.shutdown_timeout(Duration::from_millis(100));
    Ok(())
}

/// Readiness includes "can reach a name server": a node agent that cannot
/// would only turn every pod's traffic into resets.
async fn probe_name_servers(addrs: Vec<std::net::SocketAddr>, admin: Arc<AdminState>) {
    loop {
        let mut ok = false;
        for a in &addrs {
            if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(a)).await {
                ok = true;
                break;
            }
        }
        if admin.namesrv_ok.swap(ok, Ordering::Relaxed) != ok {
            info!(reachable = ok, "name server reachability changed");
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}
