//! Which consumer groups get Pull→Pop conversion (protocol.md §4.2 scope gate).

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use super::error::PopError;
use super::heartbeat::{ConsumeType, ConsumerData, MessageModel};

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ConvertPolicy {
    #[default]
    None,
    All,
    Groups(BTreeSet<String>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Convert,
    /// Why not, for logs and the status page.
    PassThrough(&'static str),
}

impl ConvertPolicy {
    /// Only clustering push consumers convert: everything else either owns its offsets
    /// (pull/lite-pull), needs every message (broadcasting), already pops, or needs queue locks.
    pub fn decide(&self, consumer: &ConsumerData, orderly_seen: bool) -> Decision {
        let listed = match self {
            ConvertPolicy::None => false,
            ConvertPolicy::All => true,
            ConvertPolicy::Groups(g) => g.contains(&consumer.group_name),
        };
        if !listed {
            return Decision::PassThrough("group not selected by the convert policy");
        }
        match &consumer.message_model {
            MessageModel::Clustering => {}
            MessageModel::Broadcasting => return Decision::PassThrough("broadcasting consumer"),
            MessageModel::Unknown(_) => return Decision::PassThrough("unknown message model"),
        }
        match &consumer.consume_type {
            ConsumeType::Passively => {}
            ConsumeType::Actively => {
                return Decision::PassThrough("pull/lite-pull consumer (CONSUME_ACTIVELY)")
            }
            ConsumeType::Pop => return Decision::PassThrough("native POP consumer"),
            ConsumeType::Unknown(_) => return Decision::PassThrough("unknown consume type"),
        }
        if orderly_seen {
            return Decision::PassThrough("orderly consumer (sent LOCK_BATCH_MQ)");
        }
        Decision::Convert
    }
}

impl FromStr for ConvertPolicy {
    type Err = PopError;

    /// "none" | "all" (case-insensitive) | "g1,g2" (group names are case-sensitive).
    fn from_str(s: &str) -> Result<Self, PopError> {
        let t = s.trim();
        if t.eq_ignore_ascii_case("none") {
            return Ok(ConvertPolicy::None);
        }
        if t.eq_ignore_ascii_case("all") {
            return Ok(ConvertPolicy::All);
        }
        let groups: BTreeSet<String> = t
            .split(',')
            .map(str::trim)
            .filter(|g| !g.is_empty())
            .map(str::to_owned)
            .collect();
        // An empty list is almost certainly a config mistake; make the operator say "none".
        if groups.is_empty() {
            return Err(PopError::Policy(s.to_owned()));
        }
        Ok(ConvertPolicy::Groups(groups))
    }
}

impl fmt::Display for ConvertPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConvertPolicy::None => f.write_str("none"),
            ConvertPolicy::All => f.write_str("all"),
            ConvertPolicy::Groups(g) => {
                f.write_str(&g.iter().map(String::as_str).collect::<Vec<_>>().join(","))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::heartbeat::ConsumeFromWhere;
    use super::*;

    fn consumer(group: &str, ct: ConsumeType, mm: MessageModel) -> ConsumerData {
        ConsumerData {
            group_name: group.into(),
            consume_type: ct,
            message_model: mm,
            consume_from_where: ConsumeFromWhere::LastOffset,
            subscriptions: vec![],
        }
    }

    #[test]
    fn parse_and_display() {
        assert_eq!("none".parse::<ConvertPolicy>().unwrap(), ConvertPolicy::None);
        assert_eq!(" ALL ".parse::<ConvertPolicy>().unwrap(), ConvertPolicy::All);
        let g: ConvertPolicy = "b, a,,a".parse().unwrap();
        assert_eq!(g.to_string(), "a,b");
        assert!("".parse::<ConvertPolicy>().is_err());
        assert!(" , ".parse::<ConvertPolicy>().is_err());
    }

    #[test]
    fn only_clustering_push_converts() {
        use ConsumeType::*;
        use MessageModel::*;
        let p = ConvertPolicy::All;
        assert_eq!(p.decide(&consumer("g", Passively, Clustering), false), Decision::Convert);
        for (ct, mm) in [
            (Passively, Broadcasting),
            (Actively, Clustering),
            (Pop, Clustering),
            (ConsumeType::Unknown("9".into()), Clustering),
            (Passively, MessageModel::Unknown("x".into())),
        ] {
            assert!(matches!(p.decide(&consumer("g", ct, mm), false), Decision::PassThrough(_)));
        }
        assert!(matches!(
            p.decide(&consumer("g", Passively, Clustering), true),
            Decision::PassThrough(_)
        ));
        let only_a: ConvertPolicy = "a".parse().unwrap();
        assert_eq!(only_a.decide(&consumer("a", Passively, Clustering), false), Decision::Convert);
        assert!(matches!(
            only_a.decide(&consumer("b", Passively, Clustering), false),
            Decision::PassThrough(_)
        ));
        assert!(matches!(
            ConvertPolicy::None.decide(&consumer("a", Passively, Clustering), false),
            Decision::PassThrough(_)
        ));
    }
}
