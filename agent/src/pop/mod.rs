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

/// Removes and returns connection `id`'s entries from a table keyed by (connection, opaque).
pub fn take_conn_entries<V>(table: &mut std::collections::HashMap<(u64, i32), V>, id: u64) -> Vec<(i32, V)> {
    let opaques: Vec<i32> = table.keys().filter(|(c, _)| *c == id).map(|(_, o)| *o).collect();
    opaques.into_iter().filter_map(|o| table.remove(&(id, o)).map(|v| (o, v))).collect()
}
