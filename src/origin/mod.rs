//! Talking to origins: server selection with health and circuit breakers, retry backoff and
//! budget, the chunk cache's own origin client, and the resolution of server names.

pub mod backoff;
pub mod breaker;
pub mod budget;
pub mod failing;
pub mod fetch;
pub mod outcome;
pub mod peer;
pub mod pool;
pub mod resolve;

use outcome::FailureClass;
use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of what resilience did, for logs, `/stats` and metrics.
#[derive(Debug, Default)]
pub struct ResilienceStats {
    /// Tries after the first, for chunk fetches and pass-through requests.
    pub retries: AtomicU64,
    /// Retries refused because the budget was spent.
    pub retries_over_budget: AtomicU64,
    /// Retries given back to the budget: their request was answered in the end, or their try
    /// could not connect (`origin::budget`).
    pub retries_given_back: AtomicU64,
    /// Failed tries not retried because their URL had just failed on every server
    /// (`origin::failing`).
    pub retries_skipped_failing_url: AtomicU64,
    pub breaker_opened: AtomicU64,
    pub breaker_half_opened: AtomicU64,
    pub breaker_closed: AtomicU64,
    /// Tries routed in panic mode: every server of the group was ejected or marked down by
    /// health checks, so the request went to one anyway rather than failing.
    pub all_ejected: AtomicU64,
    /// Trips (`Closed → Open`) held back because `max_ejected_percent` of the group was already
    /// ejected.
    pub ejections_capped: AtomicU64,
    /// Failures charged to servers' breakers, by [`FailureClass`] (index: `FailureClass::index`).
    pub failures: [AtomicU64; FailureClass::ALL.len()],
    /// Gateway answers (502/503/504) not charged to anyone: the server was alone, or every server
    /// tried failed the same request.
    pub gateway_uncharged: AtomicU64,
    /// Chunk fetches resumed on another server after a failure mid-body.
    pub resumes: AtomicU64,
    /// Responses served stale because every origin failed.
    pub stale_served: AtomicU64,
    /// The metrics registry: pools take their upstream's and servers' figures from it.
    pub metrics: std::sync::Arc<crate::metrics::Metrics>,
}

impl ResilienceStats {
    /// Counters starting at zero, feeding `metrics`.
    pub fn new(metrics: std::sync::Arc<crate::metrics::Metrics>) -> ResilienceStats {
        ResilienceStats {
            metrics,
            ..ResilienceStats::default()
        }
    }
}

impl ResilienceStats {
    /// Count a failure charged to a server.
    pub fn count_failure(&self, class: FailureClass) {
        if let Some(c) = self.failures.get(class.index()) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn failures_of(&self, class: FailureClass) -> u64 {
        self.failures
            .get(class.index())
            .map(|c| c.load(Ordering::Relaxed))
            .unwrap_or(0)
    }
}
