//! One captured connection: recover where the pod was going, check policy,
//! open the matching upstream, and relay frames byte-exact in both directions
//! while tracking requests (either side may send them) for logs and metrics.
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use std::sync::OnceLock;

use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::addr::{OrigDst, PodAddr};
use crate::codec::header::Header;
use crate::codec::{code, encode_frame, request_code_name, CodecError, FrameMeta, FrameScanner, Limits};
use crate::metrics::Metrics;
use crate::policy::DestinationPolicy;
use crate::socket::{self, SocketFactory};
use crate::state::{ConnHistory, ConnStats, Registry};

/// Everything a connection needs from the agent, shared by all of them.
pub struct ProxyCtx {
    pub sockets: Arc<dyn SocketFactory>,
    pub policy: DestinationPolicy,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    pub connect_timeout: Duration,
    pub spoof_source: bool,
    pub access_log: bool,
    pub registry: Arc<Registry>,
    /// Flips to true when a successor agent takes over: every connection
    /// pauses at a read boundary and is handed to it.
    pub migrate: watch::Receiver<bool>,
    /// Where paused connections go; set before `migrate` flips.
    pub handoff: OnceLock<mpsc::UnboundedSender<MigratedConn>>,
    /// Connections queued for the successor but not yet sent; the old agent
    /// must not exit while any are left.
    pub in_transit: AtomicUsize,
    /// Set while draining without a successor: clients that understand
    /// GO_AWAY get it instead of their next request being relayed.
    pub draining: AtomicBool,
    /// Features that handle some requests themselves (Pull→Pop conversion).
    pub interceptor: Option<Arc<dyn Interceptor>>,
    /// The successor takes the interceptor's per-connection state: no connection is pinned.
    pub successor_adopts_state: AtomicBool,
}

/// RocketMQ clients newer than 5.3.1 (version ordinal 475) reconnect and
/// retry once on GO_AWAY; older ones would just fail the request.
const GO_AWAY_MIN_VERSION: i32 = 476;

/// What the relay does with a frame whose header it has just validated.
pub enum Verdict {
    Forward,
    /// Forward it, and give the interceptor a copy once complete (e.g. heartbeats).
    Inspect,
    /// Withhold the whole frame and give it to the interceptor once complete.
    Take,
    /// Withhold and drop it (e.g. a broker notification the agent answers itself).
    Drop,
    /// Withhold and drop it, and send this frame back to the client instead.
    Answer(Vec<u8>),
}

/// How much of the broker's response to a client request an interceptor wants to see;
/// the response itself is always forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Watch {
    Ignore,
    /// Its header, via [`Interceptor::response_header`], before any of it is forwarded
    /// (so state it creates exists before the client can act on the response).
    Header,
    /// A copy of the whole frame, via [`Interceptor::inspected`], once complete.
    Frame,
}

/// A feature that handles some frames itself instead of relaying them.
pub trait Interceptor: Send + Sync + 'static {
    fn client_request(&self, conn: &ConnHandle, header: &Header) -> Verdict;
    fn broker_request(&self, conn: &ConnHandle, header: &Header) -> Verdict;
    /// What to see of the broker's response to a client request (`request_code`).
    fn watch_response(&self, conn: &ConnHandle, request_code: i32) -> Watch;
    /// The header of a response watched with [`Watch::Header`].
    fn response_header(&self, conn: &ConnHandle, request_code: i32, header: &Header);
    /// A frame taken with [`Verdict::Take`], complete (prefix, header and body).
    fn taken(&self, conn: &ConnHandle, header: Header, frame: Vec<u8>);
    /// A copy of a frame forwarded with [`Verdict::Inspect`], complete.
    fn inspected(&self, conn: &ConnHandle, header: Header, frame: Vec<u8>);
    fn closed(&self, conn: &ConnHandle);
    /// The connection paused for a hand-over (instead of `closed`): finish or answer what is
    /// under way for it (answers go to the client before the sockets move) and return its
    /// state for the successor.
    fn export<'a>(&'a self, conn: &'a ConnHandle) -> Pin<Box<dyn Future<Output = Option<String>> + Send + 'a>>;
    /// State a predecessor exported for this (inherited) connection.
    fn adopt(&self, conn: &ConnHandle, state: &str);
    /// State shared by all connections (learned routes), for a successor.
    fn export_shared(&self) -> Option<String>;
    fn adopt_shared(&self, state: &str);
    /// Whether the connection holds state that cannot move to a successor agent that does
    /// not adopt state.
    fn pins(&self, conn: &ConnHandle) -> bool;
}

/// What an interceptor may use of a connection, from any task.
#[derive(Clone)]
pub struct ConnHandle {
    pub id: u64,
    pub pod: PodAddr,
    pub dst: OrigDst,
    out: Arc<Outboxes>,
}

/// Frames the agent queues for one direction of a connection. Not a tokio channel: an
/// unbounded one allocates about a kilobyte up front, and every idle connection has two.
#[derive(Default)]
pub struct Outbox {
    queue: Mutex<std::collections::VecDeque<Vec<u8>>>,
    ready: tokio::sync::Notify,
}

impl Outbox {
    fn push(&self, frame: Vec<u8>) {
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).push_back(frame);
        self.ready.notify_one();
    }

    pub fn try_pop(&self) -> Option<Vec<u8>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).pop_front()
    }

    /// Writes every queued frame to `to`.
    async fn flush(&self, to: &TcpStream) -> io::Result<()> {
        while let Some(f) = self.try_pop() {
            write_all(to, &f).await?;
        }
        Ok(())
    }

    /// The next frame; cancel-safe (a frame is only taken when returned).
    async fn recv(&self) -> Vec<u8> {
        loop {
            if let Some(f) = self.try_pop() {
                return f;
            }
            self.ready.notified().await;
        }
    }
}

#[derive(Default)]
pub struct Outboxes {
    to_client: Outbox,
    to_broker: Outbox,
    closed: AtomicBool,
}

impl ConnHandle {
    /// Queues a whole frame for the client; it is written at the next frame
    /// boundary of the broker's stream. False once the connection is gone.
    pub fn send_to_client(&self, frame: Vec<u8>) -> bool {
        self.send(&self.out.to_client, frame)
    }

    /// Queues a whole frame for this connection's broker (e.g. a taken request
    /// that turned out to need no special handling); written at the next frame
    /// boundary of the client's stream. False once the connection is gone.
    pub fn send_to_broker(&self, frame: Vec<u8>) -> bool {
        self.send(&self.out.to_broker, frame)
    }

    fn send(&self, to: &Outbox, frame: Vec<u8>) -> bool {
        if self.out.closed.load(Ordering::Acquire) {
            return false;
        }
        to.push(frame);
        true
    }

    #[cfg(test)]
    pub fn for_test(id: u64, pod: PodAddr, dst: OrigDst) -> (Self, Arc<Outboxes>) {
        let out = Arc::new(Outboxes::default());
        (ConnHandle { id, pod, dst, out: out.clone() }, out)
    }
}

#[cfg(test)]
impl Outboxes {
    pub fn client(&self) -> &Outbox {
        &self.to_client
    }
}

/// What one direction of a paused connection carries to the successor:
/// bytes read but not yet forwarded (an incomplete frame header) and how much
/// of a streaming body is still to come.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Carry {
    pub pending: Vec<u8>,
    pub body_left: usize,
    pub body_frame_len: usize,
}

/// A live connection on its way to the successor agent.
pub struct MigratedConn {
    pub client: TcpStream,
    pub upstream: TcpStream,
    pub pod: PodAddr,
    pub dst: OrigDst,
    pub moved: Moved,
}

/// What a paused connection takes to the successor besides its sockets.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Moved {
    pub up: Carry,
    pub down: Carry,
    #[serde(default)]
    pub requests: Unanswered,
    /// The interceptor's state for it (JSON), see [`Interceptor::export`].
    #[serde(default)]
    pub state: Option<String>,
    /// Age, byte and request counts, SDK and groups, so `status` goes on showing them.
    #[serde(default)]
    pub history: Option<ConnHistory>,
}

/// Requests awaiting their answer when a connection moves, as (opaque, code): the
/// successor times them and shows their answers to the interceptor.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Unanswered {
    pub client: Vec<(i32, i32)>,
    pub broker: Vec<(i32, i32)>,
}

/// Which peer sent a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    /// The pod (SDK).
    Client,
    /// The broker or name server.
    Broker,
}

impl Side {
    fn label(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Broker => "broker",
        }
    }
    fn bytes_dir(self) -> &'static str {
        match self {
            Side::Client => "up",
            Side::Broker => "down",
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum RelayError {
    #[error("{0}")]
    Malformed(CodecError),
    #[error("peer closed the connection mid-frame ({seen} of {len} bytes)")]
    Truncated { seen: usize, len: usize },
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Start with a small buffer and grow only for connections that move bulk
/// data; idle connections hold no buffer at all.
const INITIAL_BUF: usize = 16 * 1024;
const MAX_BUF: usize = 256 * 1024;
/// Wake-up size while streaming a large body (see SO_RCVLOWAT in `pump`).
const LOWAT_CHUNK: usize = 128 * 1024;
/// Unanswered requests tracked per direction; beyond this new ones are not
/// timed (they are still relayed). Bounds memory against a misbehaving peer.
const MAX_INFLIGHT: usize = 65_536;
/// After one side closes, how long the other may keep sending.
const HALF_CLOSE_LINGER: Duration = Duration::from_secs(30);

/// Serves one accepted connection to completion.
pub async fn serve(ctx: Arc<ProxyCtx>, client: TcpStream, peer: SocketAddr) {
    let pod = PodAddr::new(peer);
    let dst = match ctx.sockets.orig_dst(&client) {
        Ok(d) => d,
        Err(e) => {
            ctx.metrics.connection("no_orig_dst");
            warn!(%pod, error = %e, "cannot recover the original destination; check that the capture mode (--capture) matches the installed rules");
            socket::reset(&client);
            return;
        }
    };
    if let Err(refusal) = ctx.policy.check(dst) {
        ctx.metrics.connection(refusal.label());
        warn!(%pod, orig_dst = %dst, reason = refusal.reason(), why = %refusal, "refused connection");
        socket::reset(&client);
        return;
    }
    let upstream = match connect(&ctx, pod, dst).await {
        Ok(s) => s,
        Err(e) => {
            ctx.metrics.connection("upstream_failed");
            warn!(%pod, orig_dst = %dst, error = %e, "upstream connect failed; resetting the client so it fails over at once");
            socket::reset(&client);
            return;
        }
    };
    let _ = socket::set_keepalive(&socket2::SockRef::from(&client), Duration::from_secs(30));
    let _ = client.set_nodelay(true);
    ctx.metrics.connection("proxied");
    debug!(%pod, orig_dst = %dst, "connection opened");
    let ends = Ends { client, upstream, pod, dst };
    run(ctx, ends, Moved::default()).await;
}

/// Continues a connection that the predecessor agent paused and handed over.
pub async fn resume(ctx: Arc<ProxyCtx>, m: MigratedConn) {
    ctx.metrics.connection("inherited");
    debug!(pod = %m.pod, orig_dst = %m.dst, state = m.moved.state.is_some(), "connection inherited from the previous agent");
    let ends = Ends { client: m.client, upstream: m.upstream, pod: m.pod, dst: m.dst };
    run(ctx, ends, m.moved).await;
}

struct Ends {
    client: TcpStream,
    upstream: TcpStream,
    pod: PodAddr,
    dst: OrigDst,
}

async fn run(ctx: Arc<ProxyCtx>, ends: Ends, moved: Moved) {
    static IDS: AtomicU64 = AtomicU64::new(1);
    let Ends { client, upstream, pod, dst } = ends;
    let Moved { up, down, requests: unanswered, state, history } = moved;
    ctx.metrics.connections_active.inc();
    let client_version = history.as_ref().and_then(|h| h.client.as_ref()).map_or(0, |c| c.1);
    let registration = ctx.registry.register(pod, dst, history);
    let out = Arc::new(Outboxes::default());
    let handle = ConnHandle { id: IDS.fetch_add(1, Ordering::Relaxed), pod, dst, out: out.clone() };
    let now = Instant::now();
    let table = |v: Vec<(i32, i32)>| Mutex::new(Inflight(v.into_iter().map(|(o, c)| (o, (c, now))).collect()));
    let conn = Conn {
        ctx: &ctx,
        pod,
        dst,
        stats: &registration.stats,
        handle,
        client_version: AtomicI32::new(client_version),
        client_reqs: table(unanswered.client),
        broker_reqs: table(unanswered.broker),
        requests: AtomicU64::new(0),
    };
    match (&ctx.interceptor, state) {
        (Some(i), Some(state)) => i.adopt(&conn.handle, &state),
        (None, Some(_)) => warn!(%pod, orig_dst = %dst, "the previous agent handed over Pull→Pop state but conversion and ack routing are off here; its messages come back after the invisible time"),
        _ => {}
    }
    let end = conn.relay(&client, &upstream, up, down, &out.to_broker, &out.to_client).await;
    let mut state = None;
    if let Some(i) = &ctx.interceptor {
        match end {
            RelayEnd::Paused(..) => state = i.export(&conn.handle).await,
            RelayEnd::Closed => i.closed(&conn.handle),
        }
    }
    if let RelayEnd::Paused(..) = end {
        // What the agent queued, including answers given while winding down: both streams
        // are at frame boundaries.
        let flushed = async {
            out.to_client.flush(&client).await?;
            out.to_broker.flush(&upstream).await
        };
        if let Err(e) = flushed.await {
            debug!(%pod, orig_dst = %dst, error = %e, "could not write the agent's last answers before the hand-over");
        }
    }
    // Whatever is queued from now on has nowhere to go.
    out.closed.store(true, Ordering::Release);
    let requests = Unanswered { client: conn.unanswered(&conn.client_reqs), broker: conn.unanswered(&conn.broker_reqs) };
    let history = Some(registration.stats.history());
    drop(registration);
    if let RelayEnd::Paused(up, down) = end {
        let m = MigratedConn { client, upstream, pod, dst, moved: Moved { up, down, requests, state, history } };
        ctx.in_transit.fetch_add(1, Ordering::SeqCst);
        match ctx.handoff.get().map(|tx| tx.send(m).is_ok()) {
            Some(true) => ctx.metrics.connection("handed_over"),
            // The successor went away mid-hand-over: closing is all that is left.
            _ => {
                ctx.in_transit.fetch_sub(1, Ordering::SeqCst);
                warn!(%pod, orig_dst = %dst, "could not hand the connection to the new agent; closing it");
            }
        }
    }
    ctx.metrics.connections_active.dec();
}

enum RelayEnd {
    Closed,
    Paused(Carry, Carry),
}

enum PumpEnd {
    Eof(u64),
    Paused(u64, Carry),
}

async fn connect(ctx: &ProxyCtx, pod: PodAddr, dst: OrigDst) -> io::Result<TcpStream> {
    let spoof = ctx.spoof_source.then(|| pod.ip());
    let sock = ctx.sockets.upstream(dst, spoof).map_err(io::Error::other)?;
    match tokio::time::timeout(ctx.connect_timeout, sock.connect(dst.0)).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out (--connect-timeout-ms)")),
    }
}

#[derive(Default)]
struct Inflight(HashMap<i32, (i32, Instant)>);

struct Conn<'a> {
    ctx: &'a ProxyCtx,
    pod: PodAddr,
    dst: OrigDst,
    stats: &'a ConnStats,
    handle: ConnHandle,
    /// The SDK's protocol version, from its first request (0 = none yet).
    client_version: AtomicI32,
    /// Requests the pod sent, awaiting the broker's response.
    client_reqs: Mutex<Inflight>,
    /// Requests the broker sent (e.g. CHECK_TRANSACTION_STATE), awaiting the pod's response.
    broker_reqs: Mutex<Inflight>,
    /// Requests seen in both directions.
    requests: AtomicU64,
}

impl Conn<'_> {
    async fn relay(
        &self,
        client: &TcpStream,
        broker: &TcpStream,
        up: Carry,
        down: Carry,
        up_injections: &Outbox,
        down_injections: &Outbox,
    ) -> RelayEnd {
        let up = self.pump(client, broker, Side::Client, up, up_injections);
        let down = self.pump(broker, client, Side::Broker, down, down_injections);
        tokio::pin!(up, down);
        let (first, result) = tokio::select! {
            r = &mut up => (Side::Client, r),
            r = &mut down => (Side::Broker, r),
        };
        let rest = match first {
            Side::Client => &mut down,
            Side::Broker => &mut up,
        };
        let (up_bytes, down_bytes, outcome) = match result {
            Ok(PumpEnd::Paused(n, carry)) => match rest.await {
                Ok(PumpEnd::Paused(m, other)) => {
                    let (u, d) = if first == Side::Client { (carry, other) } else { (other, carry) };
                    let (ub, db) = if first == Side::Client { (n, m) } else { (m, n) };
                    info!(pod = %self.pod, orig_dst = %self.dst, bytes_up = ub, bytes_down = db, "connection paused for hand-over");
                    return RelayEnd::Paused(u, d);
                }
                // The other side finished while this one paused: nothing to hand over.
                Ok(PumpEnd::Eof(_)) => (0, 0, "closed during hand-over".to_string()),
                Err(e) => {
                    self.on_error(first.other(), &e);
                    socket::reset(client);
                    socket::reset(broker);
                    (0, 0, e.to_string())
                }
            },
            Ok(PumpEnd::Eof(n)) => {
                // Clean close on one side: pass the FIN on and let the other
                // direction finish what it was sending.
                let closed_to = if first == Side::Client { broker } else { client };
                let _ = socket2::SockRef::from(closed_to).shutdown(std::net::Shutdown::Write);
                let m = match tokio::time::timeout(HALF_CLOSE_LINGER, rest).await {
                    Ok(Ok(PumpEnd::Eof(m) | PumpEnd::Paused(m, _))) => m,
                    Ok(Err(e)) => {
                        self.on_error(first.other(), &e);
                        0
                    }
                    Err(_) => 0,
                };
                let (u, d) = if first == Side::Client { (n, m) } else { (m, n) };
                (u, d, format!("{} closed", first.label()))
            }
            Err(e) => {
                self.on_error(first, &e);
                socket::reset(client);
                socket::reset(broker);
                (0, 0, e.to_string())
            }
        };
        // Requests still open when the connection ends (long-poll PULLs, or
        // work lost with a dying peer) are reported, not silently dropped.
        let pending = |t: &Mutex<Inflight>| t.lock().unwrap_or_else(|p| p.into_inner()).0.len();
        info!(
            pod = %self.pod,
            orig_dst = %self.dst,
            bytes_up = up_bytes,
            bytes_down = down_bytes,
            requests = self.requests.load(Ordering::Relaxed),
            unanswered_client_requests = pending(&self.client_reqs),
            unanswered_broker_requests = pending(&self.broker_reqs),
            reason = %outcome,
            "connection closed"
        );
        RelayEnd::Closed
    }

    fn on_error(&self, side: Side, e: &RelayError) {
        match e {
            RelayError::Malformed(c) => {
                self.ctx.metrics.frame_error(c.kind(), side.label());
                warn!(pod = %self.pod, orig_dst = %self.dst, side = side.label(), kind = c.kind(), error = %c, "malformed frame, closing connection");
            }
            RelayError::Truncated { .. } => {
                self.ctx.metrics.frame_error("truncated", side.label());
                warn!(pod = %self.pod, orig_dst = %self.dst, side = side.label(), kind = "truncated", error = %e, "malformed frame, closing connection");
            }
            RelayError::Io(io) => {
                debug!(pod = %self.pod, orig_dst = %self.dst, side = side.label(), error = %io, "connection error");
            }
        }
    }

    /// Copies `from` → `to`, validating every frame header on the way and
    /// forwarding only bytes that belong to validated frames; frames an
    /// interceptor takes or drops are withheld. Each pump also writes frames
    /// the interceptor injects (answers to the client, requests it gives back
    /// to the broker), only at frame boundaries of its own stream.
    /// Returns the byte count on a clean EOF at a frame boundary.
    async fn pump(
        &self,
        from: &TcpStream,
        to: &TcpStream,
        side: Side,
        carry: Carry,
        injections: &Outbox,
    ) -> Result<PumpEnd, RelayError> {
        let mut scanner = FrameScanner::resume(self.ctx.limits, (carry.body_left, carry.body_frame_len));
        let mut frames: Vec<FrameMeta> = Vec::new();
        let mut buf: Vec<u8> = carry.pending;
        let mut want = INITIAL_BUF.max(buf.len());
        let mut total = 0u64;
        let mut tail = Tail::Forward;
        let mut migrate = self.ctx.migrate.clone();
        let mut lowat = 1usize;
        // Pinned to this agent by state the successor cannot take: relays until it closes.
        let mut stay = false;
        loop {
            let at_boundary = match tail {
                Tail::Forward | Tail::Inspect { .. } => scanner.body_state().0 == 0,
                Tail::Take { .. } | Tail::Drop { .. } => true,
            };
            // Only here does `buf` hold nothing but not-yet-forwardable bytes,
            // so this is where a connection may pause for a hand-over.
            tokio::select! {
                biased;
                true = migrating(&mut migrate), if at_boundary && matches!(tail, Tail::Forward) && !stay => {
                    // Decided when the hand-over starts, not when this select began.
                    if self.pinned() {
                        stay = true;
                        continue;
                    }
                    // Frames still queued for `to` are written by `run` once both sides paused.
                    let (body_left, body_frame_len) = scanner.body_state();
                    return Ok(PumpEnd::Paused(total, Carry { pending: buf, body_left, body_frame_len }));
                }
                frame = injections.recv(), if at_boundary => {
                    write_all(to, &frame).await?;
                    continue;
                }
                r = from.readable() => r?,
            }
            if buf.capacity() == 0 {
                buf = pool::take(want);
            } else if buf.capacity() < want {
                buf.reserve(want - buf.len());
            }
            let before = buf.len();
            match from.try_read_buf(&mut buf) {
                Ok(0) => {
                    if let Some((seen, len)) = scanner.mid_frame() {
                        return Err(RelayError::Truncated { seen, len });
                    }
                    if !buf.is_empty() {
                        return Err(RelayError::Truncated { seen: buf.len(), len: 0 });
                    }
                    return Ok(PumpEnd::Eof(total));
                }
                Ok(n) => {
                    if before + n == buf.capacity() && want < MAX_BUF {
                        want *= 2;
                    }
                    let out = scanner.scan(&buf, &mut frames);
                    let forwarded = self.route(side, &buf[..out.consumed], &mut frames, &mut tail, to).await?;
                    total += forwarded;
                    self.ctx.metrics.add_bytes(side.bytes_dir(), forwarded);
                    let counter = if side == Side::Client { &self.stats.bytes_up } else { &self.stats.bytes_down };
                    counter.fetch_add(forwarded, Ordering::Relaxed);
                    buf.drain(..out.consumed);
                    if let Some(e) = out.error {
                        return Err(RelayError::Malformed(e));
                    }
                    // Inside a large body, wake up for big chunks, never for more
                    // than the sender still owes; back to 1 byte at frame ends.
                    let body_left = scanner.body_state().0;
                    let want_lowat = if body_left >= 2 * LOWAT_CHUNK { LOWAT_CHUNK } else { 1 };
                    if want_lowat != lowat && crate::sys::set_recv_lowat(std::os::fd::AsFd::as_fd(from), want_lowat as i32).is_ok() {
                        lowat = want_lowat;
                    }
                    // A header larger than the buffer: make room (the scanner
                    // caps `need` at the header limit).
                    want = want.max(out.need);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Drained: lend the buffer to the next busy connection on
                    // this thread instead of holding it while idle.
                    if buf.is_empty() {
                        pool::give(std::mem::take(&mut buf));
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Sends the validated bytes `data` on, frame by frame as verdicts say;
    /// returns how many bytes were forwarded. `tail` says what to do with
    /// the rest of a frame that continues past `data`.
    async fn route(&self, side: Side, data: &[u8], frames: &mut Vec<FrameMeta>, tail: &mut Tail, to: &TcpStream) -> io::Result<u64> {
        // Bytes before the first new frame continue the previous one.
        let cont_end = frames.first().map_or(data.len(), |f| f.offset);
        let mut run_start = match tail {
            Tail::Forward => 0,
            Tail::Inspect { frame, left, header } => {
                frame.extend_from_slice(&data[..cont_end]);
                *left -= cont_end;
                if *left == 0 {
                    let (h, f) = (header.clone(), std::mem::take(frame));
                    *tail = Tail::Forward;
                    self.inspect(h, f);
                }
                0
            }
            Tail::Take { frame, left, header } => {
                frame.extend_from_slice(&data[..cont_end]);
                *left -= cont_end;
                if *left == 0 {
                    let (h, f) = (header.clone(), std::mem::take(frame));
                    *tail = Tail::Forward;
                    self.deliver(h, f);
                }
                cont_end
            }
            Tail::Drop { left } => {
                *left -= cont_end;
                if *left == 0 {
                    *tail = Tail::Forward;
                }
                cont_end
            }
        };
        let mut forwarded = 0u64;
        for f in frames.drain(..) {
            let verdict = self.verdict(side, &f);
            if matches!(verdict, Verdict::Forward | Verdict::Inspect) {
                self.on_frame(side, &f);
                *tail = Tail::Forward;
                if matches!(verdict, Verdict::Inspect) {
                    let end = (f.offset + f.frame_len).min(data.len());
                    let left = f.offset + f.frame_len - end;
                    let frame = data[f.offset..end].to_vec();
                    if left == 0 {
                        self.inspect(f.header, frame);
                    } else {
                        *tail = Tail::Inspect { header: f.header, frame, left };
                    }
                }
                continue;
            }
            // Flush the run of forwarded bytes before the withheld frame.
            write_all(to, &data[run_start..f.offset]).await?;
            forwarded += (f.offset - run_start) as u64;
            let end = (f.offset + f.frame_len).min(data.len());
            let left = f.offset + f.frame_len - end;
            run_start = end;
            self.count_local(side, &f.header);
            match verdict {
                Verdict::Take if left == 0 => self.deliver(f.header, data[f.offset..end].to_vec()),
                Verdict::Take => *tail = Tail::Take { header: f.header, frame: data[f.offset..end].to_vec(), left },
                Verdict::Answer(resp) => {
                    self.handle.send_to_client(resp);
                    *tail = if left == 0 { Tail::Forward } else { Tail::Drop { left } };
                }
                Verdict::Drop | Verdict::Forward | Verdict::Inspect => *tail = if left == 0 { Tail::Forward } else { Tail::Drop { left } },
            }
        }
        write_all(to, &data[run_start..]).await?;
        forwarded += (data.len() - run_start) as u64;
        Ok(forwarded)
    }

    fn verdict(&self, side: Side, f: &FrameMeta) -> Verdict {
        let h = &f.header;
        if h.is_response() {
            if let (Some(i), Side::Broker) = (&self.ctx.interceptor, side) {
                let code = self.client_reqs.lock().unwrap_or_else(|p| p.into_inner()).0.get(&h.opaque).map(|r| r.0);
                if let Some(c) = code {
                    match i.watch_response(&self.handle, c) {
                        Watch::Ignore => {}
                        Watch::Header => i.response_header(&self.handle, c, h),
                        Watch::Frame => return Verdict::Inspect,
                    }
                }
            }
            return Verdict::Forward;
        }
        if side == Side::Client {
            if self.client_version.load(Ordering::Relaxed) == 0 {
                self.client_version.store(h.version.max(1), Ordering::Relaxed);
            }
            if self.ctx.draining.load(Ordering::Relaxed) && !h.is_oneway() && h.version >= GO_AWAY_MIN_VERSION {
                let resp = Header::response(code::GO_AWAY, h.opaque, Some("rmq-agent is shutting down; reconnect".into()));
                return Verdict::Answer(encode_frame(&resp, &[]));
            }
        }
        match (&self.ctx.interceptor, side) {
            (Some(i), Side::Client) => i.client_request(&self.handle, h),
            (Some(i), Side::Broker) => match i.broker_request(&self.handle, h) {
                // Only the client side can be answered or taken; the broker's
                // own requests can be relayed, inspected or dropped.
                v @ (Verdict::Forward | Verdict::Inspect) => v,
                _ => Verdict::Drop,
            },
            (None, _) => Verdict::Forward,
        }
    }

    fn deliver(&self, header: Header, frame: Vec<u8>) {
        if let Some(i) = &self.ctx.interceptor {
            i.taken(&self.handle, header, frame);
        }
    }

    fn inspect(&self, header: Header, frame: Vec<u8>) {
        if let Some(i) = &self.ctx.interceptor {
            i.inspected(&self.handle, header, frame);
        }
    }

    fn pinned(&self) -> bool {
        !self.ctx.successor_adopts_state.load(Ordering::Relaxed) && self.ctx.interceptor.as_ref().is_some_and(|i| i.pins(&self.handle))
    }

    fn unanswered(&self, table: &Mutex<Inflight>) -> Vec<(i32, i32)> {
        table.lock().unwrap_or_else(|p| p.into_inner()).0.iter().map(|(o, (c, _))| (*o, *c)).collect()
    }

    /// Requests the agent handled itself are counted but not timed.
    fn count_local(&self, side: Side, h: &Header) {
        self.ctx.metrics.request(code_label(h.code), side.label(), "", "");
        self.stats.request(code_label(h.code));
        self.requests.fetch_add(1, Ordering::Relaxed);
        debug!(pod = %self.pod, orig_dst = %self.dst, dir = side.label(), code = h.code, opaque = h.opaque, "request handled by the agent");
    }

    fn on_frame(&self, side: Side, f: &FrameMeta) {
        let h = &f.header;
        let now = Instant::now();
        let (mine, theirs) = match side {
            Side::Client => (&self.client_reqs, &self.broker_reqs),
            Side::Broker => (&self.broker_reqs, &self.client_reqs),
        };
        if h.is_response() {
            // A response answers a request the *other* side sent.
            let started = theirs.lock().unwrap_or_else(|p| p.into_inner()).0.remove(&h.opaque);
            if let Some((code, at)) = started {
                self.ctx.metrics.latency(code_label(code), now - at);
                self.access(side.other(), code, h.opaque, false, Some(h.code), Some(now - at));
            }
            return;
        }
        // SEND_MESSAGE_V2 and batches use one-letter keys (a = producer group, b = topic).
        let short = matches!(h.code, code::SEND_MESSAGE_V2 | code::SEND_BATCH_MESSAGE);
        let topic = h.ext(if short { "b" } else { "topic" }).unwrap_or("");
        let group = if short { h.ext("a") } else { ["consumerGroup", "producerGroup", "group"].iter().find_map(|k| h.ext(k)) };
        let group = group.unwrap_or("");
        self.ctx.metrics.request(code_label(h.code), side.label(), topic, group);
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.stats.request(code_label(h.code));
        if side == Side::Client {
            self.stats.client(&h.language, h.version);
            if !group.is_empty() {
                self.stats.group(group);
            }
        }
        if h.is_oneway() {
            self.access(side, h.code, h.opaque, true, None, None);
            return;
        }
        let mut table = mine.lock().unwrap_or_else(|p| p.into_inner());
        if table.0.len() < MAX_INFLIGHT {
            table.0.insert(h.opaque, (h.code, now));
        }
    }

    fn access(&self, dir: Side, code: i32, opaque: i32, oneway: bool, response_code: Option<i32>, latency: Option<Duration>) {
        if !self.ctx.access_log {
            return;
        }
        info!(
            target: "rmq_agent::access",
            pod = %self.pod,
            orig_dst = %self.dst,
            dir = dir.label(),
            code,
            code_name = code_label(code),
            opaque,
            oneway,
            response_code,
            latency_us = latency.map(|d| d.as_micros() as u64),
            "request"
        );
    }
}

impl Side {
    fn other(self) -> Side {
        match self {
            Side::Client => Side::Broker,
            Side::Broker => Side::Client,
        }
    }
}

/// Unknown codes share one label so a peer cannot blow up metric cardinality.
fn code_label(code: i32) -> &'static str {
    request_code_name(code).unwrap_or("UNKNOWN")
}

/// Read buffers lent between connections on one worker thread: an idle
/// connection holds none, and a busy one does not pay for a fresh (and
/// page-faulting) allocation every time its socket drains.
mod pool {
    use std::cell::RefCell;

    const MAX_POOLED: usize = 16;

    thread_local! {
        static FREE: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
    }

    pub fn take(want: usize) -> Vec<u8> {
        FREE.with(|f| {
            let mut f = f.borrow_mut();
            match f.iter().position(|b| b.capacity() >= want) {
                Some(i) => f.swap_remove(i),
                None => Vec::with_capacity(want),
            }
        })
    }

    pub fn give(buf: Vec<u8>) {
        if buf.capacity() < super::INITIAL_BUF {
            return;
        }
        FREE.with(|f| {
            let mut f = f.borrow_mut();
            if f.len() < MAX_POOLED {
                f.push(buf);
            }
        });
    }
}

/// What to do with the rest of a frame that continues past the bytes read so far.
enum Tail {
    Forward,
    Inspect { header: Header, frame: Vec<u8>, left: usize },
    Take { header: Header, frame: Vec<u8>, left: usize },
    Drop { left: usize },
}

/// Resolves once a hand-over starts (never if the agent is not upgrading).
async fn migrating(rx: &mut watch::Receiver<bool>) -> bool {
    rx.wait_for(|m| *m).await.is_ok()
}

async fn write_all(to: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        to.writable().await?;
        match to.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
