//! Netlink: the fwmark → local-table policy routing (v4 and v6), and the facts that
//! decide `captureMode: auto` (is the pod behind a Linux bridge?).
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use futures::TryStreamExt;
use netlink_packet_route::link::{InfoKind, InfoPortKind, LinkAttribute, LinkInfo, LinkMessage};
use netlink_packet_route::route::{RouteAttribute, RouteMessage, RouteScope, RouteType};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use netlink_packet_route::AddressFamily;
use rtnetlink::{Handle, IpVersion, RouteMessageBuilder};

use rmq_common::{CAPTURE_MARK, CAPTURE_MASK, ROUTE_TABLE, RULE_PRIORITY};

use crate::rules::Family;

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("netlink {what} failed: {err}")]
    Netlink { what: String, err: String },
    #[error("netlink {0} did not answer in time")]
    Timeout(String),
}

/// What the plugin asks of the node's routing; a trait so tests can fake it.
pub trait Routing {
    /// Installs the policy rule and local route when missing; returns what it added
    /// (so a failed ADD can remove exactly that).
    fn ensure(&self, f: Family) -> Result<Vec<Added>, RouteError>;
    fn remove(&self, f: Family, added: &Added) -> Result<(), RouteError>;
    /// Missing pieces, described for the operator; empty when all is in place.
    fn missing(&self, f: Family) -> Result<Vec<String>, RouteError>;
    /// Whether traffic to `ip` leaves through a Linux bridge (or a bridge port).
    fn behind_bridge(&self, host_ifaces: &[&str], ip: &IpAddr) -> Result<bool, RouteError>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Added {
    Rule,
    Route,
}

pub struct Netlink {
    limit: Duration,
}

impl Netlink {
    pub fn new(limit: Duration) -> Self {
        Netlink { limit }
    }

    /// One short-lived connection per call, on a current-thread runtime, under a time limit.
    fn with_handle<T, F, Fut>(&self, what: &str, f: F) -> Result<T, RouteError>
    where
        F: FnOnce(Handle) -> Fut,
        Fut: std::future::Future<Output = Result<T, rtnetlink::Error>>,
    {
        let nl = |err: String| RouteError::Netlink { what: what.to_string(), err };
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| nl(e.to_string()))?;
        rt.block_on(async {
            let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| nl(e.to_string()))?;
            let task = tokio::spawn(conn);
            let r = tokio::time::timeout(self.limit, f(handle)).await;
            task.abort();
            match r {
                Err(_) => Err(RouteError::Timeout(what.to_string())),
                Ok(r) => r.map_err(|e| nl(e.to_string())),
            }
        })
    }

    fn our_rule_present(rules: &[RuleMessage]) -> bool {
        rules.iter().any(|r| {
            let a = &r.attributes;
            let table = a.iter().find_map(|x| if let RuleAttribute::Table(t) = x { Some(*t) } else { None })
                .unwrap_or(r.header.table as u32);
            // Without FR_ACT_TO_TBL the rule matches but looks nothing up.
            r.header.action == RuleAction::ToTable
                && a.contains(&RuleAttribute::FwMark(CAPTURE_MARK))
                && a.contains(&RuleAttribute::FwMask(CAPTURE_MASK))
                && table == ROUTE_TABLE
        })
    }

    fn our_route_present(routes: &[RouteMessage], lo: u32) -> bool {
        routes.iter().any(|r| {
            r.header.kind == RouteType::Local
                && r.header.destination_prefix_length == 0
                && r.attributes.contains(&RouteAttribute::Oif(lo))
        })
    }

    fn dump(&self, f: Family) -> Result<(Vec<RuleMessage>, Vec<RouteMessage>, u32), RouteError> {
        let ver = match f {
            Family::V4 => IpVersion::V4,
            Family::V6 => IpVersion::V6,
        };
        self.with_handle("dump policy routing", |h| async move {
            let rules: Vec<RuleMessage> = h.rule().get(ver.clone()).execute().try_collect().await?;
            let filter = match f {
                Family::V4 => RouteMessageBuilder::<Ipv4Addr>::new().table_id(ROUTE_TABLE).build(),
                Family::V6 => RouteMessageBuilder::<Ipv6Addr>::new().table_id(ROUTE_TABLE).build(),
            };
            let routes: Vec<RouteMessage> = h.route().get(filter).execute().try_collect().await?;
            let routes = routes.into_iter().filter(|r| route_table(r) == ROUTE_TABLE).collect();
            let lo: Vec<LinkMessage> = h.link().get().match_name("lo".to_string()).execute().try_collect().await?;
            let lo = lo.first().map(|l| l.header.index).unwrap_or(1);
            Ok((rules, routes, lo))
        })
    }

    fn link(&self, name: &str) -> Result<Option<LinkMessage>, RouteError> {
        let name = name.to_string();
        self.with_handle("get link", |h| async move {
            match h.link().get().match_name(name).execute().try_next().await {
                Ok(l) => Ok(l),
                // ENODEV: the interface is gone (or was never in this netns).
                Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -19 => Ok(None),
                Err(e) => Err(e),
            }
        })
    }

    fn link_by_index(&self, index: u32) -> Result<Option<LinkMessage>, RouteError> {
        self.with_handle("get link", |h| async move {
            match h.link().get().match_index(index).execute().try_next().await {
                Ok(l) => Ok(l),
                Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -19 => Ok(None),
                Err(e) => Err(e),
            }
        })
    }

    /// The output interface of the route to `ip` in the main table (longest prefix match).
    fn oif_to(&self, ip: &IpAddr) -> Result<Option<u32>, RouteError> {
        let ip = *ip;
        self.with_handle("route lookup", |h| async move {
            let msg = match ip {
                IpAddr::V4(a) => RouteMessageBuilder::<Ipv4Addr>::new().destination_prefix(a, 32).build(),
                IpAddr::V6(a) => RouteMessageBuilder::<Ipv6Addr>::new().destination_prefix(a, 128).build(),
            };
            let mut req = h.route().get(msg);
            // A RTM_GETROUTE without NLM_F_DUMP is a lookup (`ip route get`).
            req.message_mut().header.flags = Default::default();
            let routes: Vec<RouteMessage> = match req.execute().try_collect().await {
                Ok(r) => r,
                Err(_) => Vec::new(),
            };
            Ok(routes.iter().find_map(|r| r.attributes.iter().find_map(|a| if let RouteAttribute::Oif(i) = a { Some(*i) } else { None })))
        })
    }
}

fn route_table(r: &RouteMessage) -> u32 {
    r.attributes.iter().find_map(|a| if let RouteAttribute::Table(t) = a { Some(*t) } else { None }).unwrap_or(r.header.table as u32)
}

fn is_bridge(l: &LinkMessage) -> bool {
    l.attributes.iter().any(|a| matches!(a, LinkAttribute::LinkInfo(i) if i.contains(&LinkInfo::Kind(InfoKind::Bridge))))
}

fn is_bridge_port(l: &LinkMessage) -> bool {
    l.attributes.iter().any(|a| matches!(a, LinkAttribute::LinkInfo(i) if i.contains(&LinkInfo::PortKind(InfoPortKind::Bridge))))
}

impl Routing for Netlink {
    fn ensure(&self, f: Family) -> Result<Vec<Added>, RouteError> {
        let (rules, routes, lo) = self.dump(f)?;
        let mut added = Vec::new();
        if !Self::our_rule_present(&rules) {
            let r = self.with_handle("add fwmark rule", |h| async move {
                let req = h.rule().add().fw_mark(CAPTURE_MARK).table_id(ROUTE_TABLE).priority(RULE_PRIORITY).action(RuleAction::ToTable);
                let res = match f {
                    Family::V4 => { let mut q = req.v4(); q.message_mut().attributes.push(RuleAttribute::FwMask(CAPTURE_MASK)); q.execute().await }
                    Family::V6 => { let mut q = req.v6(); q.message_mut().attributes.push(RuleAttribute::FwMask(CAPTURE_MASK)); q.execute().await }
                };
                match res {
                    // EEXIST: a concurrent run (another node component) added it first.
                    Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -17 => Ok(false),
                    Err(e) => Err(e),
                    Ok(()) => Ok(true),
                }
            })?;
            if r {
                added.push(Added::Rule);
            }
        }
        if !Self::our_route_present(&routes, lo) {
            let r = self.with_handle("add local route", |h| async move {
                let msg = match f {
                    Family::V4 => RouteMessageBuilder::<Ipv4Addr>::new().kind(RouteType::Local).scope(RouteScope::Host).table_id(ROUTE_TABLE).output_interface(lo).build(),
                    Family::V6 => RouteMessageBuilder::<Ipv6Addr>::new().kind(RouteType::Local).scope(RouteScope::Host).table_id(ROUTE_TABLE).output_interface(lo).build(),
                };
                h.route().add(msg).replace().execute().await
            });
            if let Err(e) = r {
                // The caller journals only what we return, so undo our half here.
                for a in &added {
                    let _ = self.remove(f, a);
                }
                return Err(e);
            }
            added.push(Added::Route);
        }
        Ok(added)
    }

    fn remove(&self, f: Family, added: &Added) -> Result<(), RouteError> {
        let (rules, routes, lo) = self.dump(f)?;
        match added {
            Added::Rule => {
                for r in rules.into_iter().filter(|r| Self::our_rule_present(std::slice::from_ref(r))) {
                    self.with_handle("delete fwmark rule", |h| async move { h.rule().del(r).execute().await })?;
                }
            }
            Added::Route => {
                for r in routes.into_iter().filter(|r| Self::our_route_present(std::slice::from_ref(r), lo)) {
                    self.with_handle("delete local route", |h| async move { h.route().del(r).execute().await })?;
                }
            }
        }
        Ok(())
    }

    fn missing(&self, f: Family) -> Result<Vec<String>, RouteError> {
        let (rules, routes, lo) = self.dump(f)?;
        let [rule, route] = crate::rules::policy_routing(f);
        let mut out = Vec::new();
        if !Self::our_rule_present(&rules) {
            out.push(rule);
        }
        if !Self::our_route_present(&routes, lo) {
            out.push(route);
        }
        Ok(out)
    }

    fn behind_bridge(&self, host_ifaces: &[&str], ip: &IpAddr) -> Result<bool, RouteError> {
        let mut seen = false;
        for name in host_ifaces {
            if let Some(l) = self.link(name)? {
                seen = true;
                if is_bridge(&l) || is_bridge_port(&l) {
                    return Ok(true);
                }
            }
        }
        if seen {
            return Ok(false);
        }
        // The previous plugin listed no host interface: ask the routing table.
        match self.oif_to(ip)? {
            Some(idx) => Ok(self.link_by_index(idx)?.map(|l| is_bridge(&l) || is_bridge_port(&l)).unwrap_or(false)),
            None => Ok(false),
        }
    }
}

/// `net.bridge.bridge-nf-call-iptables` (v4) / `-ip6tables` (v6) of this netns;
/// absent (br_netfilter not loaded) means off.
pub fn bridge_nf_call(f: Family) -> bool {
    let name = match f {
        Family::V4 => "bridge-nf-call-iptables",
        Family::V6 => "bridge-nf-call-ip6tables",
    };
    std::fs::read_to_string(format!("/proc/sys/net/bridge/{name}")).map(|s| s.trim() == "1").unwrap_or(false)
}

#[allow(dead_code)]
fn family_of(af: AddressFamily) -> Option<Family> {
    match af {
        AddressFamily::Inet => Some(Family::V4),
        AddressFamily::Inet6 => Some(Family::V6),
        _ => None,
    }
}
