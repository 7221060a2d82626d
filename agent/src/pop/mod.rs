//! Pull→Pop conversion logic (protocol.md §4.2): pure functions and state, no I/O.
//! The relay feeds it frames and sends what it returns.
//!
//! ACL (protocol.md §7): every request built here is agent-originated and **unsigned**; the agent
//! does not re-sign. Brokers with ACL enabled will reject them until agent credentials exist.

pub mod ackroute;
pub mod batch;
pub mod error;
pub mod heartbeat;
pub mod policy;
pub mod receipt;
pub mod requests;
pub mod route;
pub mod session;

pub use error::PopError;
