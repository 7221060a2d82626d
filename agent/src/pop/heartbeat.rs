//! HEART_BEAT body (`HeartbeatData`, protocol.md §2.3), parsed tolerantly: rocketmq-client-cpp
//! sends enums as ordinals and `subVersion` as a string, Java/Rust send names and numbers,
//! and every SDK adds or omits fields of its own.

use serde_json::Value;

use super::error::PopError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeartbeatData {
    pub client_id: String,
    pub consumers: Vec<ConsumerData>,
    pub producers: Vec<ProducerData>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProducerData {
    pub group_name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConsumerData {
    pub group_name: String,
    pub consume_type: ConsumeType,
    pub message_model: MessageModel,
    pub consume_from_where: ConsumeFromWhere,
    pub subscriptions: Vec<SubscriptionData>,
}

impl ConsumerData {
    pub fn subscription(&self, topic: &str) -> Option<&SubscriptionData> {
        self.subscriptions.iter().find(|s| s.topic == topic)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SubscriptionData {
    pub topic: String,
    pub sub_string: String,
    /// "TAG" when absent (the cpp client omits it; it only knows tags).
    pub expression_type: String,
    pub tags_set: Vec<String>,
    pub sub_version: i64,
}

/// Unknown values are kept so the policy can pass such groups through instead of guessing.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ConsumeType {
    /// Pull / lite-pull consumers (CONSUME_ACTIVELY, ordinal 0).
    Actively,
    /// Push consumers (CONSUME_PASSIVELY, ordinal 1).
    Passively,
    /// Native POP consumers (CONSUME_POP, ordinal 2).
    Pop,
    Unknown(String),
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum MessageModel {
    Broadcasting,
    Clustering,
    Unknown(String),
}

/// Java's `ConsumeFromWhere`, in ordinal order (cpp uses the same order).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ConsumeFromWhere {
    LastOffset,
    LastOffsetAndFromMinWhenBootFirst,
    MinOffset,
    MaxOffset,
    FirstOffset,
    Timestamp,
    Unknown(String),
}

impl ConsumeFromWhere {
    /// POP `initMode`: only FIRST_OFFSET starts at the queue minimum (ConsumeInitMode MIN=0);
    /// Java's push consumer treats the deprecated variants and TIMESTAMP-less cases as LAST.
    pub fn init_mode(&self) -> i32 {
        match self {
            ConsumeFromWhere::FirstOffset => 0,
            _ => 1,
        }
    }
}

/// An enum sent as a name, an ordinal number, or an ordinal in a string.
fn enum_value<T>(v: Option<&Value>, names: &[(&str, T)]) -> Option<T>
where
    T: Clone,
{
    let v = v?;
    let by_ordinal = |n: i64| usize::try_from(n).ok().and_then(|i| names.get(i)).map(|(_, t)| t.clone());
    match v {
        Value::Number(n) => n.as_i64().and_then(by_ordinal),
        Value::String(s) => match s.trim().parse::<i64>() {
            Ok(n) => by_ordinal(n),
            Err(_) => names.iter().find(|(n, _)| *n == s.trim()).map(|(_, t)| t.clone()),
        },
        _ => None,
    }
}

fn text(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    }
}

fn raw(v: Option<&Value>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "(absent)".into())
}

fn array<'a>(v: Option<&'a Value>, what: &str) -> Result<&'a [Value], PopError> {
    match v {
        None | Some(Value::Null) => Ok(&[]),
        Some(Value::Array(a)) => Ok(a),
        Some(other) => Err(PopError::Heartbeat(format!(
            "{what} is not an array: {}",
            clip(&other.to_string())
        ))),
    }
}

fn clip(s: &str) -> String {
    s.chars().take(60).collect()
}

fn parse_consume_type(v: Option<&Value>) -> ConsumeType {
    use ConsumeType::*;
    enum_value(
        v,
        &[("CONSUME_ACTIVELY", Actively), ("CONSUME_PASSIVELY", Passively), ("CONSUME_POP", Pop)],
    )
    .unwrap_or_else(|| Unknown(raw(v)))
}

fn parse_message_model(v: Option<&Value>) -> MessageModel {
    use MessageModel::*;
    enum_value(v, &[("BROADCASTING", Broadcasting), ("CLUSTERING", Clustering)])
        .unwrap_or_else(|| Unknown(raw(v)))
}

fn parse_consume_from_where(v: Option<&Value>) -> ConsumeFromWhere {
    use ConsumeFromWhere::*;
    enum_value(
        v,
        &[
            ("CONSUME_FROM_LAST_OFFSET", LastOffset),
            ("CONSUME_FROM_LAST_OFFSET_AND_FROM_MIN_WHEN_BOOT_FIRST", LastOffsetAndFromMinWhenBootFirst),
            ("CONSUME_FROM_MIN_OFFSET", MinOffset),
            ("CONSUME_FROM_MAX_OFFSET", MaxOffset),
            ("CONSUME_FROM_FIRST_OFFSET", FirstOffset),
            ("CONSUME_FROM_TIMESTAMP", Timestamp),
        ],
    )
    .unwrap_or_else(|| Unknown(raw(v)))
}

fn parse_subscription(v: &Value) -> Result<SubscriptionData, PopError> {
    let topic = text(v.get("topic"));
    if topic.is_empty() {
        return Err(PopError::Heartbeat(format!(
            "subscription without a topic: {}",
            clip(&v.to_string())
        )));
    }
    let expression_type = match text(v.get("expressionType")) {
        t if t.is_empty() => "TAG".to_owned(),
        t => t,
    };
    let tags_set = array(v.get("tagsSet"), "tagsSet")?
        .iter()
        .map(|t| text(Some(t)))
        .collect();
    // Java: long; cpp: string; anything unparsable is 0 (only used to detect changes).
    let sub_version = match v.get("subVersion") {
        Some(Value::Number(n)) => n.as_i64().unwrap_or(0),
        Some(Value::String(s)) => s.trim().parse().unwrap_or(0),
        _ => 0,
    };
    Ok(SubscriptionData {
        topic,
        sub_string: text(v.get("subString")),
        expression_type,
        tags_set,
        sub_version,
    })
}

fn parse_consumer(v: &Value) -> Result<ConsumerData, PopError> {
    let group_name = text(v.get("groupName"));
    if group_name.is_empty() {
        return Err(PopError::Heartbeat(format!(
            "consumer without a groupName: {}",
            clip(&v.to_string())
        )));
    }
    let subscriptions = array(v.get("subscriptionDataSet"), "subscriptionDataSet")?
        .iter()
        .map(parse_subscription)
        .collect::<Result<_, _>>()?;
    Ok(ConsumerData {
        group_name,
        consume_type: parse_consume_type(v.get("consumeType")),
        message_model: parse_message_model(v.get("messageModel")),
        consume_from_where: parse_consume_from_where(v.get("consumeFromWhere")),
        subscriptions,
    })
}

/// Parses a HEART_BEAT request body. Unknown fields are ignored; unknown enum values are kept
/// as `Unknown` rather than rejected.
pub fn parse_heartbeat(body: &[u8]) -> Result<HeartbeatData, PopError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| PopError::HeartbeatJson(e.to_string()))?;
    if !v.is_object() {
        return Err(PopError::Heartbeat("body is not a JSON object".into()));
    }
    let consumers = array(v.get("consumerDataSet"), "consumerDataSet")?
        .iter()
        .map(parse_consumer)
        .collect::<Result<_, _>>()?;
    let producers = array(v.get("producerDataSet"), "producerDataSet")?
        .iter()
        .map(|p| ProducerData {
            group_name: text(p.get("groupName")),
        })
        .collect();
    Ok(HeartbeatData {
        client_id: text(v.get("clientID")),
        consumers,
        producers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinals_and_names_agree() {
        let cpp = br#"{"clientID":"c","consumerDataSet":[{"consumeFromWhere":4,"consumeType":1,"groupName":"g","messageModel":1,"subscriptionDataSet":[{"subString":"a||b","subVersion":"17","topic":"T"}]}]}
"#;
        let java = br#"{"clientID":"c","consumerDataSet":[{"consumeFromWhere":"CONSUME_FROM_FIRST_OFFSET","consumeType":"CONSUME_PASSIVELY","groupName":"g","messageModel":"CLUSTERING","subscriptionDataSet":[{"subString":"a||b","subVersion":17,"topic":"T","expressionType":"TAG","tagsSet":[],"extra":{"x":1}}],"unitMode":false}],"producerDataSet":[],"withoutSub":false}"#;
        let a = parse_heartbeat(cpp).unwrap();
        let b = parse_heartbeat(java).unwrap();
        assert_eq!(a, b);
        let c = &a.consumers[0];
        assert_eq!(c.consume_type, ConsumeType::Passively);
        assert_eq!(c.message_model, MessageModel::Clustering);
        assert_eq!(c.consume_from_where, ConsumeFromWhere::FirstOffset);
        assert_eq!(c.consume_from_where.init_mode(), 0);
        assert_eq!(c.subscription("T").unwrap().sub_version, 17);
        assert_eq!(c.subscription("T").unwrap().expression_type, "TAG");
    }

    #[test]
    fn unknown_values_are_kept_and_bad_shapes_rejected() {
        let h = parse_heartbeat(br#"{"consumerDataSet":[{"groupName":"g","consumeType":7,"messageModel":"X"}]}"#).unwrap();
        assert_eq!(h.consumers[0].consume_type, ConsumeType::Unknown("7".into()));
        assert_eq!(h.consumers[0].message_model, MessageModel::Unknown("\"X\"".into()));
        assert_eq!(h.consumers[0].consume_from_where, ConsumeFromWhere::Unknown("(absent)".into()));
        assert_eq!(h.consumers[0].consume_type, ConsumeType::Unknown("7".into()));
        assert!(parse_heartbeat(b"[]").is_err());
        assert!(parse_heartbeat(b"{").is_err());
        assert!(parse_heartbeat(br#"{"consumerDataSet":{}}"#).is_err());
        assert!(parse_heartbeat(br#"{"consumerDataSet":[{"consumeType":1}]}"#).is_err());
        assert_eq!(parse_heartbeat(b"{}").unwrap().consumers, vec![]);
    }
}
