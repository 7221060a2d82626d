//! Builds and runs the agent: a data-plane runtime for captured connections
//! and a separate admin thread; SIGTERM/SIGINT stop accepting and drain.
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{info, warn};

use crate::admin::{self, AdminState};
use crate::codec::Limits;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::policy::DestinationPolicy;
use crate::relay::{self, ProxyCtx};
use crate::socket::{KernelSockets, SocketFactory};

pub fn run(cfg: Config) -> anyhow::Result<()> {
    let workers = if cfg.workers == 0 { std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2) } else { cfg.workers };
    let metrics = Arc::new(Metrics::new());
    let admin_state = Arc::new(AdminState { metrics: metrics.clone(), ready: Default::default() });
    admin::spawn(cfg.admin_addr, admin_state.clone())?;

    let sockets: Arc<dyn SocketFactory> = Arc::new(KernelSockets {
        mode: cfg.capture,
        mark: rmq_common::UPSTREAM_MARK,
        keepalive: std::time::Duration::from_secs(30),
    });
    let std_listener = sockets.listener(cfg.listen)?;
    let ctx = Arc::new(ProxyCtx {
        sockets,
        policy: DestinationPolicy::new(cfg.ports.iter().copied(), cfg.allow_cidrs.clone(), cfg.listen.port()),
        metrics: metrics.clone(),
        limits: Limits { max_frame: cfg.max_frame, ..Limits::default() },
        connect_timeout: cfg.connect_timeout,
        spoof_source: cfg.spoof_source,
        access_log: cfg.access_log,
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
        admin_state.ready.store(true, Ordering::Relaxed);
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
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                },
            }
        }
        admin_state.ready.store(false, Ordering::Relaxed);
        drop(listener);
        let deadline = tokio::time::Instant::now() + cfg.drain_timeout;
        info!(active = metrics.connections_active.get(), "draining: stopped accepting, waiting for open connections");
        while metrics.connections_active.get() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        info!(left = metrics.connections_active.get(), "rmq-agent stopped");
        anyhow::Ok(())
    })?;
    // Connections still open after the drain deadline are closed by exit.
    rt.shutdown_timeout(std::time::Duration::from_millis(100));
    Ok(())
}
