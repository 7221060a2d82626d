//! Builds and runs the agent: a data-plane runtime for captured connections
//! and a separate admin thread. Stops on SIGTERM/SIGINT (drain) or when a
//! successor takes over (hand the listener and live connections over).
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::addr::{OrigDst, PodAddr};
use crate::admin::{self, AdminState};
use crate::broker_client::BrokerClients;
use crate::convert::Converter;
use crate::pop::policy::ConvertPolicy;
use crate::state::ConvertedGroupView;
use crate::codec::Limits;
use crate::config::Config;
use crate::handoff::{self, HandoffListener, Msg, Peer};
use crate::logging::LogLevelHandle;
use crate::metrics::Metrics;
use crate::policy::DestinationPolicy;
use crate::relay::{self, MigratedConn, ProxyCtx};
use crate::socket::{CaptureMode, KernelSockets, SocketFactory};
use crate::state::{ListenerView, Registry};

/// Set by SIGTERM/SIGINT once the agent stopped accepting.
static STOP_ASKED: AtomicBool = AtomicBool::new(false);

/// How long a predecessor waits for its successor to say it is accepting.
const TAKEOVER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a predecessor waits for the broker requests it started (see `Converter::settle`).
const SETTLE_AFTER_HANDOVER: Duration = Duration::from_secs(26);

pub fn run(cfg: Config, log_level: Option<LogLevelHandle>) -> anyhow::Result<()> {
    let workers = if cfg.workers == 0 { std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2) } else { cfg.workers };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name("rmq-data")
        .enable_all()
        .build()
        .context("cannot start the data-plane runtime")?;
    let idle_after = cfg.idle_after_handover;
    let cfg_idle = cfg.clone();
    let ended = rt.block_on(serve(cfg, log_level, workers))?;
    // Connections still open after the drain deadline are closed here (their tasks are dropped).
    rt.shutdown_timeout(Duration::from_millis(100));
    if ended == Ended::HandedOver && idle_after && !STOP_ASKED.load(Ordering::SeqCst) {
        let idle = tokio::runtime::Builder::new_current_thread().enable_all().build().context("cannot start the idle runtime")?;
        return idle.block_on(idle_until_sigterm(&cfg_idle));
    }
    Ok(())
}

#[derive(Debug, PartialEq, Eq)]
enum Ended {
    Stopped,
    HandedOver,
}

async fn serve(cfg: Config, log_level: Option<LogLevelHandle>, workers: usize) -> anyhow::Result<Ended> {
    let metrics = Arc::new(Metrics::new());
    let registry = Arc::new(Registry::default());
    let admin = Arc::new(AdminState::new(metrics.clone(), registry.clone(), log_level));
    let sockets: Arc<dyn SocketFactory> = Arc::new(KernelSockets { mode: cfg.capture, mark: rmq_common::UPSTREAM_MARK, keepalive: Duration::from_secs(30) });

    // Take the listener over from a running agent, or bind a new one.
    let predecessor = handoff::connect_predecessor(&cfg.handoff_socket).context("cannot reach the hand-off socket")?;
    let (std_listener, generation, predecessor) = match predecessor {
        Some(peer) => {
            let (listener, generation) = take_listener(&peer).await.context("taking over from the running agent failed; stop it or remove its hand-off socket")?;
            (listener, generation + 1, Some(peer))
        }
        None => (sockets.listener(cfg.listen)?, 0, None),
    };
    admin.generation.store(generation, Ordering::Relaxed);
    admin.listeners.lock().unwrap_or_else(|p| p.into_inner()).push(ListenerView {
        addr: cfg.listen.to_string(),
        capture: format!("{:?}", cfg.capture).to_lowercase(),
        transparent: cfg.capture != CaptureMode::Redirect,
        inherited: predecessor.is_some(),
    });
    admin::spawn(cfg.admin_addr, &cfg.admin_socket, admin.clone())?;
    let successors = HandoffListener::bind(&cfg.handoff_socket)
        .with_context(|| format!("cannot bind the hand-off socket {}", cfg.handoff_socket.display()))?;

    let limits = Limits { max_frame: cfg.max_frame, ..Limits::default() };
    // Pop-native ack routing needs the interceptor even when nothing is converted.
    let mut converter_handle: Option<Arc<Converter>> = None;
    let interceptor: Option<Arc<dyn crate::relay::Interceptor>> = if cfg.convert.policy == ConvertPolicy::None && !cfg.convert.ack_routing {
        None
    } else {
        let brokers = Arc::new(BrokerClients::new(sockets.clone(), limits, cfg.connect_timeout));
        let converter = Converter::new(cfg.convert.clone(), brokers, metrics.clone(), limits);
        let view = converter.clone();
        let gauge = metrics.clone();
        let _ = admin.converted.set(Box::new(move || {
            let groups = view.pending();
            gauge.pending_receipts.set(groups.iter().map(|g| g.2 as i64).sum());
            let routes = view.ack_routes();
            gauge.pop_ack_routes.set(routes as i64);
            let groups = groups.into_iter().map(|(group, topic, pending_receipts)| ConvertedGroupView { group, topic, pending_receipts }).collect();
            crate::state::PopState { groups, ack_routes: routes as u64, routes: view.routes() }
        }));
        if cfg.convert.policy != ConvertPolicy::None {
            info!(policy = ?cfg.convert.policy, invisible_ms = cfg.convert.invisible.as_millis() as u64, "Pull→Pop conversion on");
        }
        if cfg.convert.ack_routing {
            info!("Pop-native acknowledgements are routed to the broker that served the pop");
        }
        converter_handle = Some(converter.clone());
        Some(converter)
    };
    let (migrate_tx, migrate_rx) = watch::channel(false);
    let ctx = Arc::new(ProxyCtx {
        sockets,
        policy: DestinationPolicy::new(cfg.ports.iter().copied(), cfg.allow_cidrs.clone(), cfg.listen.port()),
        metrics: metrics.clone(),
        limits,
        connect_timeout: cfg.connect_timeout,
        spoof_source: cfg.spoof_source,
        access_log: cfg.access_log,
        registry,
        migrate: migrate_rx,
        handoff: OnceLock::new(),
        in_transit: AtomicUsize::new(0),
        draining: AtomicBool::new(false),
        interceptor,
        successor_adopts_state: AtomicBool::new(false),
    });
    let listener = TcpListener::from_std(std_listener)?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    if !cfg.ready_namesrv.is_empty() {
        tokio::spawn(probe_name_servers(cfg.ready_namesrv.clone(), admin.clone()));
    }
    admin.listening.store(true, Ordering::Relaxed);
    if let Some(peer) = predecessor {
        peer.send(&Msg::Ready { pid: std::process::id(), adopts_state: ctx.interceptor.is_some() }, &[]).await?;
        tokio::spawn(inherit_connections(peer, ctx.clone()));
    }
    info!(listen = %cfg.listen, capture = ?cfg.capture, spoof_source = cfg.spoof_source, ports = ?cfg.ports, workers, generation, admin = %cfg.admin_addr, "rmq-agent listening");

    let successor = loop {
        tokio::select! {
            biased;
            _ = term.recv() => break None,
            _ = int.recv() => break None,
            r = successors.accept() => match r {
                Ok(peer) => match hand_listener(&peer, &listener, generation, &cfg).await {
                    Ok(adopts_state) => {
                        ctx.successor_adopts_state.store(adopts_state, Ordering::SeqCst);
                        break Some(peer);
                    }
                    Err(e) => warn!(error = %e, "a new agent tried to take over and failed; still serving"),
                },
                Err(e) => warn!(error = %e, "hand-off accept failed"),
            },
            r = listener.accept() => match r {
                Ok((stream, peer)) => { tokio::spawn(relay::serve(ctx.clone(), stream, peer)); }
                // Out of fds or memory: back off instead of spinning.
                Err(e) => {
                    warn!(error = %e, "accept failed; raise the fd limit if this is EMFILE");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    };
    admin.draining.store(true, Ordering::Relaxed);
    // The successor holds the same listening socket; closing our copy loses nothing.
    drop(listener);
    // A SIGTERM while handing over or settling (the supervisor deleting the old pod) means
    // "exit when done", not "idle": a later signal stream would not see it.
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        STOP_ASKED.store(true, Ordering::SeqCst);
    });
    let sender = successor.map(|peer| {
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = ctx.handoff.set(tx);
        let _ = migrate_tx.send(true);
        info!(active = metrics.connections_active.get(), "handing live connections to the new agent");
        tokio::spawn(send_connections(peer, rx, ctx.clone()))
    });
    if sender.is_none() {
        ctx.draining.store(true, Ordering::Relaxed);
        info!(active = metrics.connections_active.get(), "draining: stopped accepting, waiting for open connections; clients newer than 5.3.1 get GO_AWAY");
    }
    crate::wait::until(cfg.drain_timeout, Duration::from_millis(20), || {
        metrics.connections_active.get() == 0 && ctx.in_transit.load(Ordering::SeqCst) == 0
    })
    .await;
    let handed_over = sender.is_some();
    if let Some(task) = sender {
        // It sends Done and ends once nothing is active or queued.
        let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
    }
    if let Some(c) = converter_handle {
        // Connections that outlived the drain are about to close with the process: give
        // their messages back now instead of after the invisible time.
        c.release_everything(Duration::from_secs(3)).await;
        // Acks still on their way, and POPs of PULLs answered at the hand-over (a long
        // poll lasts up to 20 s; their messages are released when they come back).
        c.settle(if handed_over { SETTLE_AFTER_HANDOVER } else { Duration::from_secs(5) }).await;
    }
    info!(left = metrics.connections_active.get(), "rmq-agent stopped");
    if handed_over {
        admin.stop.notify_one();
        return Ok(Ended::HandedOver);
    }
    Ok(Ended::Stopped)
}

/// How often an idle predecessor checks that its successor still answers.
const SUCCESSOR_CHECK: Duration = Duration::from_secs(10);

/// A predecessor under a supervisor that restarts exited containers: stay up, holding
/// nothing, until told to stop; give up (non-zero) once no agent answers on the node,
/// so that the supervisor starts a fresh one.
async fn idle_until_sigterm(cfg: &Config) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    info!("handed over to a newer agent; idle until SIGTERM");
    let mut misses = 0;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = tokio::time::sleep(SUCCESSOR_CHECK) => {
                if tokio::net::UnixStream::connect(&cfg.admin_socket).await.is_ok() {
                    misses = 0;
                } else {
                    misses += 1;
                    warn!(misses, socket = %cfg.admin_socket.display(), "no agent answers on the admin socket");
                    if misses >= 3 {
                        anyhow::bail!("the agent that took over is gone; exiting so that a new one starts");
                    }
                }
            }
        }
    }
    info!("rmq-agent stopped (it had handed over)");
    Ok(())
}

/// New agent: ask the running one for its listening socket.
async fn take_listener(peer: &Peer) -> anyhow::Result<(std::net::TcpListener, u64)> {
    peer.send(&Msg::Takeover { pid: std::process::id() }, &[]).await?;
    let (msg, mut fds) = tokio::time::timeout(TAKEOVER_TIMEOUT, peer.recv()).await.context("the running agent did not answer")??;
    match (msg, fds.pop()) {
        (Msg::Listener { generation, listen }, Some(fd)) => {
            info!(listen, generation, "took over the listening socket from the running agent");
            let l = std::net::TcpListener::from(fd);
            l.set_nonblocking(true)?;
            Ok((l, generation))
        }
        (m, _) => anyhow::bail!("unexpected hand-off message {m:?}"),
    }
}

/// Old agent: give the listener to the successor and wait until it accepts; true if it
/// adopts connection state.
async fn hand_listener(peer: &Peer, listener: &TcpListener, generation: u64, cfg: &Config) -> anyhow::Result<bool> {
    match tokio::time::timeout(TAKEOVER_TIMEOUT, peer.recv()).await.context("timed out")?? {
        (Msg::Takeover { pid }, _) => info!(successor = pid, "a new agent is taking over"),
        (m, _) => anyhow::bail!("unexpected hand-off message {m:?}"),
    }
    peer.send(&Msg::Listener { generation, listen: cfg.listen.to_string() }, &[listener.as_raw_fd()]).await?;
    match tokio::time::timeout(TAKEOVER_TIMEOUT, peer.recv()).await.context("the new agent never became ready")?? {
        (Msg::Ready { pid, adopts_state }, _) => {
            info!(successor = pid, adopts_state, "the new agent is accepting; stopping here");
            Ok(adopts_state)
        }
        (m, _) => anyhow::bail!("unexpected hand-off message {m:?}"),
    }
}

/// Old agent: send each paused connection (both sockets + carried bytes)
/// until every connection has been handed over or closed.
async fn send_connections(peer: Peer, mut rx: mpsc::UnboundedReceiver<MigratedConn>, ctx: Arc<ProxyCtx>) {
    let mut sent = 0usize;
    let adopts = ctx.successor_adopts_state.load(Ordering::SeqCst);
    // Routes first: an inherited converted connection's next PULL needs them.
    if adopts {
        send_shared(&peer, &ctx).await;
    }
    loop {
        let idle = ctx.metrics.connections_active.get() == 0 && ctx.in_transit.load(Ordering::SeqCst) == 0;
        let m = match tokio::time::timeout(Duration::from_millis(20), rx.recv()).await {
            Ok(Some(m)) => m,
            Ok(None) => break,
            Err(_) if idle => break,
            Err(_) => continue,
        };
        let mut moved = Box::new(m.moved);
        if !adopts {
            moved.state = None;
        }
        let msg = Msg::Conn { pod: m.pod.0, dst: m.dst.0, moved };
        match peer.send(&msg, &[m.client.as_raw_fd(), m.upstream.as_raw_fd()]).await {
            Ok(()) => sent += 1,
            Err(e) => warn!(pod = %m.pod, orig_dst = %m.dst, error = %e, "could not hand a connection over; it is closed"),
        }
        ctx.in_transit.fetch_sub(1, Ordering::SeqCst);
    }
    // Again at the end: ack routes recorded while connections were still moving.
    if adopts {
        send_shared(&peer, &ctx).await;
    }
    let _ = peer.send(&Msg::Done, &[]).await;
    info!(connections = sent, "hand-over complete");
}

async fn send_shared(peer: &Peer, ctx: &ProxyCtx) {
    let Some(state) = ctx.interceptor.as_ref().and_then(|i| i.export_shared()) else { return };
    if let Err(e) = peer.send(&Msg::Shared { state }, &[]).await {
        warn!(error = %e, "could not hand the learned routes over; the new agent learns them again");
    }
}

/// New agent: resume every connection the predecessor hands over.
async fn inherit_connections(peer: Peer, ctx: Arc<ProxyCtx>) {
    let mut n = 0usize;
    loop {
        match peer.recv().await {
            Ok((Msg::Shared { state }, _)) => {
                if let Some(i) = &ctx.interceptor {
                    i.adopt_shared(&state);
                }
            }
            Ok((Msg::Conn { pod, dst, moved }, fds)) if fds.len() == 2 => {
                let mut fds = fds.into_iter();
                let (client, upstream) = (fds.next(), fds.next());
                let (Some(client), Some(upstream)) = (client, upstream) else { continue };
                let to_stream = |fd| {
                    let s = std::net::TcpStream::from(fd);
                    s.set_nonblocking(true)?;
                    tokio::net::TcpStream::from_std(s)
                };
                match (to_stream(client), to_stream(upstream)) {
                    (Ok(client), Ok(upstream)) => {
                        n += 1;
                        let m = MigratedConn { client, upstream, pod: PodAddr::new(pod), dst: OrigDst::new(dst), moved: *moved };
                        tokio::spawn(relay::resume(ctx.clone(), m));
                    }
                    _ => warn!(%pod, orig_dst = %dst, "an inherited connection could not be registered; it is closed"),
                }
            }
            Ok((Msg::Done, _)) => break,
            Ok((m, _)) => warn!(?m, "unexpected hand-off message"),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => {
                warn!(error = %e, "hand-off channel failed");
                break;
            }
        }
    }
    info!(connections = n, "inherited live connections from the previous agent");
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
