//! Typed address roles, so a pod's address can never be passed where a
//! destination is expected (and vice versa).
use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// The destination the pod dialled (a name server or broker), recovered from
/// the captured socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct OrigDst(pub SocketAddr);

/// The pod's own address: the peer of the captured connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PodAddr(pub SocketAddr);

/// Folds v4-mapped IPv6 (`::ffff:a.b.c.d`) to IPv4: a dual-stack listener sees
/// IPv4 pods that way, and rules, logs and policy all speak plain IPv4.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

impl OrigDst {
    pub fn new(addr: SocketAddr) -> Self {
        OrigDst(canonical(addr))
    }
}

impl PodAddr {
    pub fn new(addr: SocketAddr) -> Self {
        PodAddr(canonical(addr))
    }
    pub fn ip(&self) -> IpAddr {
        self.0.ip()
    }
}

impl fmt::Display for OrigDst {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for PodAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folds_v4_mapped() {
        let a: SocketAddr = "[::ffff:10.200.2.2]:9876".parse().unwrap();
        assert_eq!(OrigDst::new(a).to_string(), "10.200.2.2:9876");
        let b: SocketAddr = "[fd00:200:2::2]:9876".parse().unwrap();
        assert_eq!(PodAddr::new(b).to_string(), "[fd00:200:2::2]:9876");
    }
}
