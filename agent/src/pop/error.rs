//! Errors of the Pull→Pop conversion logic. Messages name the input that was wrong, since
//! they end up in operator logs next to a broker or client address.

use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PopError {
    #[error("heartbeat body is not valid JSON: {0}")]
    HeartbeatJson(String),
    #[error("heartbeat body: {0}")]
    Heartbeat(String),
    #[error("invalid pull-to-pop policy {0:?}: expected \"none\", \"all\" or a comma-separated list of consumer groups")]
    Policy(String),
    #[error("message batch: record at byte {at}: {what}")]
    Batch { at: usize, what: String },
    #[error("message batch: record {range:?} does not lie inside the {len}-byte body")]
    RecordOutOfBody {
        range: std::ops::Range<usize>,
        len: usize,
    },
    #[error("{code_name} response (code {code}) is not SUCCESS; no receipts to build")]
    NotSuccess { code: i32, code_name: &'static str },
    #[error("{what} response header: field {field:?} is {problem}")]
    ResponseField {
        what: &'static str,
        field: &'static str,
        problem: String,
    },
    #[error("POP response header {field} {value:?}: {problem}")]
    OffsetInfo {
        field: &'static str,
        value: String,
        problem: String,
    },
    #[error("receipt handle (extraInfo/POP_CK) {handle:?}: {problem}")]
    ExtraInfo { handle: String, problem: String },
    #[error("cannot BATCH_ACK: {0}")]
    BatchAck(String),
}
