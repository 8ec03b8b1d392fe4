//! Retry budget (in the style of Envoy's and Finagle's): retries are capped at a percentage of
//! the requests seen over a sliding window, with a small floor of retries always allowed so a
//! lone request can still retry.
//!
//! The budget protects a struggling origin from retry storms: when most requests fail, retrying
//! each of them would multiply the load exactly when the origin can least take it.
//!
//! The window is a ring of [`BUCKETS`] buckets of `window / BUCKETS` each. Every bucket counter
//! is a single `AtomicU64` packing the bucket's slot number (high 32 bits) with its count (low 32
//! bits), so a stale bucket is recycled by the same compare-and-swap that counts into it:
//! [`RetryBudget::record_request`] is lock-free and cheap enough for every request. Spending a
//! retry takes a short mutex so that concurrent retries cannot overshoot the budget.
//!
//! This module must never sleep, never block beyond that short mutex, never allocate after
//! construction and never panic on any input (zero window, zero or huge percent, counters
//! saturate rather than wrap). Time comes from `tokio::time::Instant`, so tests run on tokio's
//! paused clock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// Number of buckets the sliding window is split into.
pub const BUCKETS: usize = 10;

/// A retry budget shared by all requests to one upstream group. `Send + Sync`.
pub struct RetryBudget {
    percent: u64,
    min_per_window: u64,
    base: Instant,
    /// Length of one bucket, in nanoseconds (at least 1).
    bucket_nanos: u128,
    /// Per-bucket `(slot, count)` words; an all-zero word is an empty bucket.
    requests: [AtomicU64; BUCKETS],
    retries: [AtomicU64; BUCKETS],
    /// Serialises check-then-spend in `try_retry` so that retries never exceed the budget.
    spend: Mutex<()>,
}

impl std::fmt::Debug for RetryBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetryBudget")
            .field("percent", &self.percent)
            .field("min_per_window", &self.min_per_window)
            .field("window", &self.window())
            .finish_non_exhaustive()
    }
}

impl RetryBudget {
    /// `percent`: retries allowed as a percentage of requests in the window (e.g. 20; values
    /// above 100 are allowed). `min_per_window`: retries always allowed per window regardless of
    /// traffic (e.g. 3), so a lone request can still retry. `window`: e.g. 10s; it is split into
    /// [`BUCKETS`] buckets, so the effective window slides in steps of `window / BUCKETS`.
    /// A zero window is treated as the smallest possible (1ns buckets).
    pub fn new(percent: u32, min_per_window: u32, window: Duration) -> Self {
        let bucket_nanos = (window.as_nanos() / BUCKETS as u128).max(1);
        RetryBudget {
            percent: u64::from(percent),
            min_per_window: u64::from(min_per_window),
            base: Instant::now(),
            bucket_nanos,
            requests: std::array::from_fn(|_| AtomicU64::new(0)),
            retries: std::array::from_fn(|_| AtomicU64::new(0)),
            spend: Mutex::new(()),
        }
    }

    /// Count one request (first attempts, not retries) towards the budget. Lock-free.
    pub fn record_request(&self) {
        let slot = self.current_slot();
        bump(&self.requests[bucket_index(slot)], slot);
    }

    /// Try to spend one retry: true if the retries in the window are fewer than
    /// `max(min_per_window, requests_in_window * percent / 100)`; the retry is recorded when true.
    pub fn try_retry(&self) -> bool {
        let _guard = self.spend.lock().unwrap_or_else(|e| e.into_inner());
        let slot = self.current_slot();
        let requests = sum(&self.requests, slot);
        let retries = sum(&self.retries, slot);
        let allowed = (requests.saturating_mul(self.percent) / 100).max(self.min_per_window);
        if retries < allowed {
            bump(&self.retries[bucket_index(slot)], slot);
            true
        } else {
            false
        }
    }

    /// Retries still available in the current window (for metrics and the admin page).
    pub fn remaining(&self) -> u64 {
        let slot = self.current_slot();
        let requests = sum(&self.requests, slot);
        let retries = sum(&self.retries, slot);
        let allowed = (requests.saturating_mul(self.percent) / 100).max(self.min_per_window);
        allowed.saturating_sub(retries)
    }

    /// The window length the buckets add up to.
    pub fn window(&self) -> Duration {
        let nanos = self.bucket_nanos.saturating_mul(BUCKETS as u128);
        let secs = u64::try_from(nanos / 1_000_000_000).unwrap_or(u64::MAX);
        Duration::new(secs, u32::try_from(nanos % 1_000_000_000).unwrap_or(0))
    }

    /// The slot number (bucket-sized steps since `base`), truncated to 32 bits. Truncation only
    /// matters if a bucket stays untouched for exactly a multiple of 2^32 slots, which would
    /// merely let one stale count be seen again.
    fn current_slot(&self) -> u32 {
        let elapsed = Instant::now()
            .saturating_duration_since(self.base)
            .as_nanos();
        (elapsed / self.bucket_nanos) as u32
    }
}

fn pack(slot: u32, count: u32) -> u64 {
    ((slot as u64) << 32) | count as u64
}

fn unpack(word: u64) -> (u32, u32) {
    ((word >> 32) as u32, word as u32)
}

fn bucket_index(slot: u32) -> usize {
    slot as usize % BUCKETS
}

/// Add one to the bucket for `slot`, recycling it first if it still holds an older slot.
fn bump(cell: &AtomicU64, slot: u32) {
    // The closure always returns Some, so this never fails; the result carries nothing we need.
    let _ = cell.fetch_update(Ordering::AcqRel, Ordering::Acquire, |word| {
        let (stamp, count) = unpack(word);
        let count = if stamp == slot {
            count.saturating_add(1)
        } else {
            1
        };
        Some(pack(slot, count))
    });
}

/// Sum the buckets whose slot lies within the window ending at `slot`.
fn sum(cells: &[AtomicU64; BUCKETS], slot: u32) -> u64 {
    cells
        .iter()
        .map(|cell| unpack(cell.load(Ordering::Acquire)))
        .filter(|(stamp, _)| slot.wrapping_sub(*stamp) < BUCKETS as u32)
        .map(|(_, count)| u64::from(count))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const WINDOW: Duration = Duration::from_secs(10);

    fn _assert_send_sync() {
        fn check<T: Send + Sync>() {}
        check::<RetryBudget>();
    }

    fn spend_all(b: &RetryBudget) -> u32 {
        let mut n = 0;
        while b.try_retry() {
            n += 1;
            assert!(n < 1_000_000, "budget never ran out");
        }
        n
    }

    #[tokio::test(start_paused = true)]
    async fn twenty_percent_of_a_hundred() {
        let b = RetryBudget::new(20, 3, WINDOW);
        for _ in 0..100 {
            b.record_request();
        }
        for i in 0..20 {
            assert!(b.try_retry(), "retry {} refused", i + 1);
        }
        assert!(!b.try_retry(), "21st retry allowed");
        assert_eq!(b.remaining(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn requests_spread_over_the_window_all_count() {
        let b = RetryBudget::new(20, 0, WINDOW);
        for _ in 0..10 {
            for _ in 0..10 {
                b.record_request();
            }
            tokio::time::advance(Duration::from_millis(900)).await;
        }
        // 9s have passed: all 100 requests are still within the window.
        assert_eq!(spend_all(&b), 20);
    }

    #[tokio::test(start_paused = true)]
    async fn budget_recovers_after_window_slides() {
        let b = RetryBudget::new(20, 3, WINDOW);
        for _ in 0..100 {
            b.record_request();
        }
        assert_eq!(spend_all(&b), 20);

        // Half a window later the spent retries (and the requests) still count.
        tokio::time::advance(WINDOW / 2).await;
        assert!(!b.try_retry());

        // Once the window has slid past, old retries no longer count against the budget.
        tokio::time::advance(WINDOW / 2).await;
        assert_eq!(b.remaining(), 3);
        for _ in 0..100 {
            b.record_request();
        }
        assert_eq!(spend_all(&b), 20);
    }

    #[tokio::test(start_paused = true)]
    async fn old_retries_expire_bucket_by_bucket() {
        let b = RetryBudget::new(0, 2, WINDOW);
        assert!(b.try_retry());
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(b.try_retry());
        assert!(!b.try_retry());
        // The first retry leaves the window; the second is still in it.
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(b.try_retry());
        assert!(!b.try_retry());
    }

    #[tokio::test(start_paused = true)]
    async fn min_per_window_without_traffic() {
        let b = RetryBudget::new(20, 3, WINDOW);
        assert_eq!(spend_all(&b), 3);
        tokio::time::advance(WINDOW).await;
        assert_eq!(spend_all(&b), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn min_per_window_when_percent_is_below_it() {
        let b = RetryBudget::new(20, 3, WINDOW);
        for _ in 0..10 {
            b.record_request();
        }
        // 20% of 10 = 2 < 3.
        assert_eq!(spend_all(&b), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn percent_zero_only_min_per_window() {
        let b = RetryBudget::new(0, 3, WINDOW);
        for _ in 0..10_000 {
            b.record_request();
        }
        assert_eq!(spend_all(&b), 3);
        let b = RetryBudget::new(0, 0, WINDOW);
        b.record_request();
        assert!(!b.try_retry());
    }

    #[tokio::test(start_paused = true)]
    async fn degenerate_inputs_do_not_panic() {
        let b = RetryBudget::new(u32::MAX, u32::MAX, Duration::ZERO);
        b.record_request();
        assert!(b.try_retry());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(b.try_retry());
        let b = RetryBudget::new(50, 0, Duration::MAX);
        b.record_request();
        b.record_request();
        assert!(b.try_retry());
        assert!(!b.try_retry());
        tokio::time::advance(Duration::from_secs(3600 * 24 * 365)).await;
        assert!(!b.try_retry());
    }

    #[test]
    fn concurrent_retries_never_overshoot() {
        let b = Arc::new(RetryBudget::new(10, 0, Duration::from_secs(3600)));
        for _ in 0..1000 {
            b.record_request();
        }
        let granted: u32 = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| s.spawn(|| (0..100).filter(|_| b.try_retry()).count() as u32))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or(0)).sum()
        });
        assert_eq!(granted, 100);
    }
}
