//! Which destinations the agent will proxy to. It is never an open relay:
//! only captured RocketMQ ports, inside the allowed CIDRs, and never itself.
use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::addr::OrigDst;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("destination port is not a configured RocketMQ port (see --ports)")]
    Port,
    #[error("destination address is outside the allowed CIDRs (see --allow-cidr)")]
    Cidr,
    #[error("destination is the agent itself or a node-local address; a pod connected to the agent directly")]
    SelfAddr,
}

impl Refusal {
    /// Short reason for the log line.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Port => "port",
            Refusal::Cidr => "cidr",
            Refusal::SelfAddr => "self",
        }
    }

    /// Metric label (`rmq_agent_connections_total{result}`).
    pub fn label(&self) -> &'static str {
        match self {
            Refusal::Port => "refused_port",
            Refusal::Cidr => "refused_cidr",
            Refusal::SelfAddr => "refused_self",
        }
    }
}

#[derive(Debug, Clone)]
pub struct DestinationPolicy {
    ports: BTreeSet<u16>,
    cidrs: Vec<IpNet>,
    agent_port: u16,
}

impl DestinationPolicy {
    pub fn new(ports: impl IntoIterator<Item = u16>, cidrs: Vec<IpNet>, agent_port: u16) -> Self {
        DestinationPolicy { ports: ports.into_iter().collect(), cidrs, agent_port }
    }

    pub fn check(&self, dst: OrigDst) -> Result<(), Refusal> {
        let ip = dst.0.ip();
        // The self check comes first: a direct connection to the listener
        // must never be relayed, whatever ports are configured.
        if dst.0.port() == self.agent_port || is_local_only(ip) {
            return Err(Refusal::SelfAddr);
        }
        if !self.ports.contains(&dst.0.port()) {
            return Err(Refusal::Port);
        }
        if !self.cidrs.iter().any(|n| n.contains(&ip)) {
            return Err(Refusal::Cidr);
        }
        Ok(())
    }
}

/// Loopback and unspecified addresses mean "this node", never a pod's broker.
fn is_local_only(ip: IpAddr) -> bool {
    ip.is_loopback() || ip.is_unspecified()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dst(s: &str) -> OrigDst {
        OrigDst::new(s.parse().unwrap())
    }

    fn policy() -> DestinationPolicy {
        DestinationPolicy::new([9876, 10911, 10909], vec!["10.200.0.0/16".parse().unwrap(), "fd00::/8".parse().unwrap()], 15001)
    }

    #[test]
    fn allows_rocketmq_ports_in_cidrs() {
        assert_eq!(policy().check(dst("10.200.2.2:9876")), Ok(()));
        assert_eq!(policy().check(dst("[fd00:200:2::2]:10911")), Ok(()));
    }

    #[test]
    fn refuses_other_ports_cidrs_and_self() {
        assert_eq!(policy().check(dst("10.200.2.2:22")), Err(Refusal::Port));
        assert_eq!(policy().check(dst("192.0.2.1:9876")), Err(Refusal::Cidr));
        assert_eq!(policy().check(dst("10.200.1.1:15001")), Err(Refusal::SelfAddr));
        assert_eq!(policy().check(dst("127.0.0.1:9876")), Err(Refusal::SelfAddr));
        assert_eq!(policy().check(dst("[::ffff:127.0.0.1]:9876")), Err(Refusal::SelfAddr));
    }
}
