//! The one place for every number and name that the agent and the CNI plugin
//! must agree on. Change a value here and both sides change together.
#![forbid(unsafe_code)]

/// Port of the agent's capture listener (`[::]:15001`, IP_TRANSPARENT).
pub const AGENT_PORT: u16 = 15001;
/// Port of the agent's Prometheus/admin HTTP endpoint, bound to loopback only.
pub const ADMIN_PORT: u16 = 15020;

/// Admin unix socket: state dump for `rmq-agent status`, runtime log level.
pub const ADMIN_SOCKET: &str = "/var/run/rmq-agent/admin.sock";
/// Unix socket on which a running agent hands its listener to its successor.
pub const HANDOFF_SOCKET: &str = "/var/run/rmq-agent/handoff.sock";

/// RocketMQ name server port.
pub const NAMESRV_PORT: u16 = 9876;
/// RocketMQ broker port.
pub const BROKER_PORT: u16 = 10911;
/// The broker's "VIP"/fast channel (`BROKER_PORT - 2`), used by old SDKs (<= 4.4.0).
pub const BROKER_VIP_PORT: u16 = 10909;
/// Destination ports captured and proxied by default.
pub const DEFAULT_ROCKETMQ_PORTS: [u16; 3] = [NAMESRV_PORT, BROKER_PORT, BROKER_VIP_PORT];

/// Mark bit set on captured packets (TPROXY `--tproxy-mark`) and on packets of
/// transparent sockets; `fwmark` policy routing sends them to the local table.
/// It must not overlap kube-proxy (0x4000/0x8000), Calico (0xffff0000) or Cilium (0x0f00).
pub const CAPTURE_MARK: u32 = 0x1;
pub const CAPTURE_MASK: u32 = 0x1;
/// SO_MARK on every socket the agent originates. Disjoint from [`CAPTURE_MARK`]:
/// a mark with the capture bit would be routed back to `lo` (a loop).
pub const UPSTREAM_MARK: u32 = 0x2;
pub const UPSTREAM_MASK: u32 = 0x2;

/// Policy routing table that routes every address to `lo` for marked packets.
pub const ROUTE_TABLE: u32 = 133;
/// Priority of the `fwmark CAPTURE_MARK lookup ROUTE_TABLE` rule.
pub const RULE_PRIORITY: u32 = 133;

/// mangle-table chain jumped to from PREROUTING; holds the per-pod TPROXY rules.
pub const CHAIN_TPROXY: &str = "RMQ_AGENT_TPROXY";
/// mangle-table chain that marks packets of the agent's transparent sockets.
pub const CHAIN_DIVERT: &str = "RMQ_AGENT_DIVERT";
/// nat-table chain jumped to from PREROUTING; holds per-pod REDIRECT rules
/// (the capture that survives br_netfilter on bridge CNIs).
pub const CHAIN_REDIRECT: &str = "RMQ_AGENT_REDIRECT";
/// Prefix of the iptables comment that tags a pod's rules.
pub const RULE_COMMENT_PREFIX: &str = "rmq-agent:";

/// Default max RocketMQ frame (Java's `frameMaxLength`): 16 MiB.
pub const DEFAULT_MAX_FRAME: usize = 16 * 1024 * 1024;
