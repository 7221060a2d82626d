//! Kernel plumbing behind one small trait: the capture listener, the original
//! destination of a captured connection, and marked upstream sockets.
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use tokio::net::{TcpSocket, TcpStream};

use crate::addr::OrigDst;
use crate::sys;

/// How captured traffic reaches the listener, which decides where the original
/// destination comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CaptureMode {
    /// TPROXY: the accepted socket's local address *is* the original destination.
    Tproxy,
    /// nat REDIRECT: the original destination is in conntrack (`SO_ORIGINAL_DST`).
    Redirect,
    /// Both kinds of pods on one node: conntrack first, then the local address.
    Auto,
}

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("cannot bind the capture listener on {addr}: {source}. Is another process on that port without SO_REUSEPORT?")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("cannot set {opt} on a socket: {source}. The agent needs CAP_NET_ADMIN (and CAP_NET_RAW) in the node's network namespace")]
    Privilege { opt: &'static str, source: io::Error },
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// The seam between the proxy and the kernel.
pub trait SocketFactory: Send + Sync + 'static {
    /// A listening socket for captured connections.
    fn listener(&self, addr: SocketAddr) -> Result<std::net::TcpListener, SocketError>;
    /// Where the pod meant to go.
    fn orig_dst(&self, accepted: &TcpStream) -> io::Result<OrigDst>;
    /// A socket toward `dst`, marked so capture rules never see it again;
    /// bound to `spoof` (the pod's IP) when source spoofing is on.
    fn upstream(&self, dst: OrigDst, spoof: Option<IpAddr>) -> Result<TcpSocket, SocketError>;
}

/// The real thing: IP_TRANSPARENT, SO_REUSEPORT and SO_MARK on Linux.
#[derive(Debug, Clone)]
pub struct KernelSockets {
    pub mode: CaptureMode,
    pub mark: u32,
    pub keepalive: Duration,
}

const LISTEN_BACKLOG: i32 = 4096;

impl SocketFactory for KernelSockets {
    fn listener(&self, addr: SocketAddr) -> Result<std::net::TcpListener, SocketError> {
        let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        if addr.is_ipv6() && addr.ip().is_unspecified() {
            // One dual-stack socket serves both IPv4 and IPv6 TPROXY.
            sock.set_only_v6(false)?;
        }
        sock.set_reuse_address(true)?;
        // A successor agent binds the same port during a hand-over.
        sock.set_reuse_port(true)?;
        // Without IP_TRANSPARENT, TPROXY'd SYNs are dropped, so it is mandatory
        // there; REDIRECT works without it.
        let transparent = set_transparent(&sock, addr);
        if let Err(e) = transparent {
            if self.mode != CaptureMode::Redirect {
                return Err(SocketError::Privilege { opt: "IP_TRANSPARENT", source: e });
            }
        }
        sock.bind(&addr.into()).map_err(|source| SocketError::Bind { addr, source })?;
        sock.listen(LISTEN_BACKLOG)?;
        sock.set_nonblocking(true)?;
        Ok(sock.into())
    }

    fn orig_dst(&self, accepted: &TcpStream) -> io::Result<OrigDst> {
        let local = || accepted.local_addr().map(OrigDst::new);
        match self.mode {
            CaptureMode::Tproxy => local(),
            CaptureMode::Redirect => sys::original_dst(accepted.as_fd()).map(OrigDst::new),
            CaptureMode::Auto => match sys::original_dst(accepted.as_fd()) {
                Ok(a) => Ok(OrigDst::new(a)),
                Err(_) => local(),
            },
        }
    }

    fn upstream(&self, dst: OrigDst, spoof: Option<IpAddr>) -> Result<TcpSocket, SocketError> {
        let sock = Socket::new(Domain::for_address(dst.0), Type::STREAM, Some(Protocol::TCP))?;
        sock.set_mark(self.mark).map_err(|source| SocketError::Privilege { opt: "SO_MARK", source })?;
        sock.set_nodelay(true)?;
        set_keepalive(&SockRef::from(&sock), self.keepalive)?;
        if let Some(ip) = spoof.filter(|ip| ip.is_ipv4() == dst.0.is_ipv4()) {
            set_transparent(&sock, dst.0).map_err(|source| SocketError::Privilege { opt: "IP_TRANSPARENT", source })?;
            sock.bind(&SocketAddr::new(ip, 0).into())?;
        }
        sock.set_nonblocking(true)?;
        Ok(TcpSocket::from_std_stream(sock.into()))
    }
}

fn set_transparent(sock: &Socket, addr: SocketAddr) -> io::Result<()> {
    sock.set_ip_transparent(true).or_else(|e| if addr.is_ipv6() { Ok(()) } else { Err(e) })?;
    if addr.is_ipv6() {
        sys::set_ipv6_transparent(sock.as_fd())?;
    }
    Ok(())
}

/// Keepalives are not hop-by-hop: the proxy must probe both legs itself, or a
/// pod deleted mid-flight leaves its upstream connection open forever.
pub fn set_keepalive(sock: &SockRef<'_>, idle: Duration) -> io::Result<()> {
    let ka = TcpKeepalive::new().with_time(idle).with_interval(Duration::from_secs(10)).with_retries(3);
    sock.set_tcp_keepalive(&ka)?;
    sock.set_tcp_user_timeout(Some(idle + Duration::from_secs(30)))
}

/// Close with RST instead of FIN: the peer learns at once that nothing is
/// behind this connection (used for refusals and failed upstreams).
pub fn reset(stream: &TcpStream) {
    let _ = SockRef::from(stream).set_linger(Some(Duration::ZERO));
}
