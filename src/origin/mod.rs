//! Talking to origins: server selection with health and circuit breakers, retry backoff and
//! budget, and the chunk cache's own origin client.

pub mod backoff;
pub mod breaker;
pub mod budget;
pub mod fetch;
pub mod pool;

use std::sync::atomic::AtomicU64;

/// Counters of what resilience did, for logs, `/stats` and metrics.
#[derive(Debug, Default)]
pub struct ResilienceStats {
    /// Tries after the first, for chunk fetches and pass-through requests.
    pub retries: AtomicU64,
    /// Retries refused because the budget was spent.
    pub retries_over_budget: AtomicU64,
    pub breaker_opened: AtomicU64,
    pub breaker_half_opened: AtomicU64,
    pub breaker_closed: AtomicU64,
    /// Requests failed fast because every server of the group was ejected.
    pub all_ejected: AtomicU64,
    /// Chunk fetches resumed on another server after a failure mid-body.
    pub resumes: AtomicU64,
    /// Responses served stale because every origin failed.
    pub stale_served: AtomicU64,
}
