//! Requests the agent itself sends to brokers (POP, ACK, CHANGE_INVISIBLETIME):
//! one multiplexed connection per broker address, separate from every pod's
//! connection, so agent opaques can never collide with an SDK's.
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use crate::addr::OrigDst;
use crate::codec::header::Header;
use crate::codec::{decode_frame, encode_frame, Limits};
use crate::socket::SocketFactory;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot connect to broker {addr}: {source}; is it up and reachable from the node?")]
    Connect { addr: SocketAddr, source: io::Error },
    #[error("broker {0} did not answer in time")]
    Timeout(SocketAddr),
    #[error("connection to broker {0} closed before it answered")]
    Closed(SocketAddr),
}

type Reply = (Header, Vec<u8>);

struct BrokerConn {
    addr: SocketAddr,
    out: mpsc::UnboundedSender<Vec<u8>>,
    waiting: Mutex<HashMap<i32, oneshot::Sender<Reply>>>,
}

pub struct BrokerClients {
    sockets: Arc<dyn SocketFactory>,
    limits: Limits,
    connect_timeout: Duration,
    conns: tokio::sync::Mutex<HashMap<SocketAddr, Arc<BrokerConn>>>,
    next_opaque: AtomicI32,
}

impl BrokerClients {
    pub fn new(sockets: Arc<dyn SocketFactory>, limits: Limits, connect_timeout: Duration) -> Self {
        BrokerClients { sockets, limits, connect_timeout, conns: Default::default(), next_opaque: AtomicI32::new(1) }
    }

    /// A fresh opaque for an agent request.
    pub fn opaque(&self) -> i32 {
        self.next_opaque.fetch_add(1, Ordering::Relaxed) & i32::MAX
    }

    /// Sends `header`+`body` to `addr` and waits for the response with the same opaque.
    pub async fn request(&self, addr: SocketAddr, header: Header, body: &[u8], timeout: Duration) -> Result<Reply, BrokerError> {
        let conn = self.conn(addr).await?;
        let (tx, rx) = oneshot::channel();
        lock(&conn.waiting).insert(header.opaque, tx);
        if conn.out.send(encode_frame(&header, body)).is_err() {
            self.forget(&conn).await;
            return Err(BrokerError::Closed(addr));
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => Err(BrokerError::Closed(addr)),
            Err(_) => {
                lock(&conn.waiting).remove(&header.opaque);
                Err(BrokerError::Timeout(addr))
            }
        }
    }

    async fn conn(&self, addr: SocketAddr) -> Result<Arc<BrokerConn>, BrokerError> {
        let mut conns = self.conns.lock().await;
        if let Some(c) = conns.get(&addr) {
            if !c.out.is_closed() {
                return Ok(c.clone());
            }
        }
        let connect = async {
            let sock = self.sockets.upstream(OrigDst::new(addr), None).map_err(io::Error::other)?;
            match tokio::time::timeout(self.connect_timeout, sock.connect(addr)).await {
                Ok(r) => r,
                Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
            }
        };
        let stream = connect.await.map_err(|source| BrokerError::Connect { addr, source })?;
        let (mut rd, mut wr) = stream.into_split();
        let (out, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
        let conn = Arc::new(BrokerConn { addr, out, waiting: Default::default() });
        tokio::spawn(async move {
            while let Some(frame) = rx.recv().await {
                if wr.write_all(&frame).await.is_err() {
                    break;
                }
            }
        });
        let reader = conn.clone();
        let limits = self.limits;
        tokio::spawn(async move {
            if let Err(e) = read_replies(&mut rd, &reader, limits).await {
                debug!(broker = %reader.addr, error = %e, "agent connection to broker ended");
            }
            // Fail every waiter at once instead of letting them time out.
            lock(&reader.waiting).clear();
        });
        conns.insert(addr, conn.clone());
        Ok(conn)
    }

    async fn forget(&self, conn: &Arc<BrokerConn>) {
        let mut conns = self.conns.lock().await;
        if conns.get(&conn.addr).is_some_and(|c| Arc::ptr_eq(c, conn)) {
            conns.remove(&conn.addr);
        }
    }
}

async fn read_replies(rd: &mut tokio::net::tcp::OwnedReadHalf, conn: &BrokerConn, limits: Limits) -> io::Result<()> {
    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    loop {
        if rd.read_buf(&mut buf).await? == 0 {
            return Ok(());
        }
        while buf.len() >= 4 {
            let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
            if len < 4 || len as usize > limits.max_frame {
                return Err(io::Error::new(io::ErrorKind::InvalidData, format!("bad frame length {len} from broker")));
            }
            let total = 4 + len as usize;
            if buf.len() < total {
                break;
            }
            let frame: Vec<u8> = buf.drain(..total).collect();
            match decode_frame(&frame, &limits) {
                Ok((h, body)) if h.is_response() => {
                    if let Some(tx) = lock(&conn.waiting).remove(&h.opaque) {
                        let _ = tx.send((h, frame[body].to_vec()));
                    }
                }
                // Brokers may push requests (e.g. NOTIFY) to any client connection; the agent has no use for them.
                Ok(_) => {}
                Err(e) => {
                    warn!(broker = %conn.addr, error = %e, "malformed frame from broker on the agent's own connection");
                    return Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string()));
                }
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
