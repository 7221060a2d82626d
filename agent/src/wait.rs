//! Waiting for a condition that nothing signals (counters shared by many tasks): the
//! drain, a connection's quiet point before a hand-over, the last broker requests.
use std::time::Duration;

/// Polls `done` every `every` until it holds or `limit` passes; whether it held.
pub async fn until(limit: Duration, every: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while !done() {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(every).await;
    }
    true
}
