//! Retry budget (in the style of Envoy's and Finagle's): retries are capped at a percentage of
//! the requests seen over a sliding window, with a small floor of retries always allowed so a
//! lone request can still retry.
//!
//! The budget protects a struggling origin from retry storms: when most requests fail, retrying
//! each of them would multiply the load exactly when the origin can least take it.
//!
//! What it counts is *wasted* retries. A retry is charged when it is admitted
//! ([`RetryBudget::try_retry`] hands out a [`RetryTicket`]), so retries in flight count, and
//! given back ([`RetryBudget::give_back`], kept per request by [`RequestRetries`]) when it
//! proved no waste:
//! - its request got an answer in the end (any status but 502/503/504): every retry of it was
//!   failover to a server that works, not a storm. So a dead or failing server beside healthy
//!   ones costs the budget nothing once its traffic moves to them;
//! - its own try could not connect (refused, unreachable, timed out): it put no load on an
//!   origin.
//!
//! Retries of requests that fail anyway stay charged (as does a retry whose outcome never
//! came). So when most of the group fails, retries are at most `max(floor, percent ×
//! requests)` per window.
//!
//! The window is a ring of [`BUCKETS`] buckets of `window / BUCKETS` each. Every bucket counter
//! is a single `AtomicU64` packing the bucket's slot number (high 32 bits) with its count (low 32
//! bits), so a stale bucket is recycled by the same compare-and-swap that counts into it:
//! [`RetryBudget::record_request`] and [`RetryBudget::give_back`] are lock-free and cheap enough
//! for every request. Spending a retry takes a short mutex so that concurrent retries cannot
//! overshoot the budget.
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

    /// Try to spend one retry: a ticket if the retries charged in the window are fewer than
    /// `max(min_per_window, requests_in_window * percent / 100)`; the retry is charged then.
    /// Hand the ticket to [`RetryBudget::give_back`] if the retry's server answers; dropping it
    /// keeps the retry charged.
    pub fn try_retry(&self) -> Option<RetryTicket> {
        let _guard = self.spend.lock().unwrap_or_else(|e| e.into_inner());
        let slot = self.current_slot();
        let requests = sum(&self.requests, slot);
        let retries = sum(&self.retries, slot);
        let allowed = (requests.saturating_mul(self.percent) / 100).max(self.min_per_window);
        if retries < allowed {
            bump(&self.retries[bucket_index(slot)], slot);
            Some(RetryTicket { slot })
        } else {
            None
        }
    }

    /// The retry of `ticket` was answered by its server: it no longer counts against the
    /// budget. Lock-free. A ticket older than the window has expired anyway: nothing to do.
    pub fn give_back(&self, ticket: RetryTicket) {
        unbump(&self.retries[bucket_index(ticket.slot)], ticket.slot);
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

/// One retry charged to a [`RetryBudget`]; give it back when the retry was answered. Dropping
/// it keeps the retry charged (it failed, or nobody knows).
#[derive(Debug)]
#[must_use = "give the ticket back with RetryBudget::give_back when the retry is answered"]
pub struct RetryTicket {
    /// The slot the retry was charged in.
    slot: u32,
}

/// The retries one request charged to the budget, and what became of them (see the module
/// doc): given back when the request is answered, or for a try that could not connect; kept
/// charged when the request fails anyway.
#[derive(Debug, Default)]
pub struct RequestRetries {
    /// Admitted, its try not started yet.
    next: Option<RetryTicket>,
    /// The try in progress is this retry.
    current: Option<RetryTicket>,
    /// Earlier retries of the request: they failed.
    failed: Vec<RetryTicket>,
}

impl RequestRetries {
    /// A retry was admitted: it is the next try.
    pub fn admitted(&mut self, ticket: RetryTicket) {
        if let Some(unused) = self.next.replace(ticket) {
            self.failed.push(unused);
        }
    }

    /// The next try starts (the admitted retry, if any).
    pub fn start_try(&mut self) {
        if let Some(done) = self.current.take() {
            self.failed.push(done);
        }
        self.current = self.next.take();
    }

    /// The current try could not connect: its retry put no load on an origin.
    pub fn not_connected(&mut self, budget: &RetryBudget) -> u64 {
        self.current.take().map_or(0, |t| {
            budget.give_back(t);
            1
        })
    }

    /// The request got an answer: all its retries were failover. Returns how many were given
    /// back.
    pub fn answered(&mut self, budget: &RetryBudget) -> u64 {
        let mut n = 0;
        for t in self.failed.drain(..).chain(self.current.take()) {
            budget.give_back(t);
            n += 1;
        }
        n
    }

    /// The request ends: a retry admitted but never started is given back; the others stay
    /// charged.
    pub fn finish(&mut self, budget: &RetryBudget) -> u64 {
        self.next.take().map_or(0, |t| {
            budget.give_back(t);
            1
        })
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

/// Take one back from the bucket for `slot`, if it still holds that slot (otherwise the charge
/// has left the window already).
fn unbump(cell: &AtomicU64, slot: u32) {
    // `None` (nothing to take back) is the expected answer for an expired charge.
    let _ = cell.fetch_update(Ordering::AcqRel, Ordering::Acquire, |word| {
        let (stamp, count) = unpack(word);
        (stamp == slot && count > 0).then(|| pack(slot, count - 1))
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
        while b.try_retry().is_some() {
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
            assert!(b.try_retry().is_some(), "retry {} refused", i + 1);
        }
        assert!(b.try_retry().is_none(), "21st retry allowed");
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
        assert!(b.try_retry().is_none());

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
        assert!(b.try_retry().is_some());
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(b.try_retry().is_some());
        assert!(b.try_retry().is_none());
        // The first retry leaves the window; the second is still in it.
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(b.try_retry().is_some());
        assert!(b.try_retry().is_none());
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
        assert!(b.try_retry().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn degenerate_inputs_do_not_panic() {
        let b = RetryBudget::new(u32::MAX, u32::MAX, Duration::ZERO);
        b.record_request();
        assert!(b.try_retry().is_some());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(b.try_retry().is_some());
        let b = RetryBudget::new(50, 0, Duration::MAX);
        b.record_request();
        b.record_request();
        assert!(b.try_retry().is_some());
        assert!(b.try_retry().is_none());
        tokio::time::advance(Duration::from_secs(3600 * 24 * 365)).await;
        assert!(b.try_retry().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn an_answered_retry_is_given_back() {
        let b = RetryBudget::new(20, 3, WINDOW);
        // Any number of retries that their servers answer cost nothing.
        for _ in 0..1000 {
            let t = b.try_retry().expect("admitted");
            b.give_back(t);
        }
        assert_eq!(b.remaining(), 3);
        // Wasted ones (tickets dropped) are charged: the floor of 3, then refused.
        for _ in 0..3 {
            drop(b.try_retry().expect("within the floor"));
        }
        assert!(b.try_retry().is_none());
        assert_eq!(b.remaining(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn tickets_in_flight_count_until_given_back() {
        let b = RetryBudget::new(0, 2, WINDOW);
        let t1 = b.try_retry().expect("first");
        let t2 = b.try_retry().expect("second");
        assert!(
            b.try_retry().is_none(),
            "two in flight fill a budget of two"
        );
        b.give_back(t1);
        let t3 = b.try_retry().expect("a slot came back");
        b.give_back(t2);
        b.give_back(t3);
        assert_eq!(b.remaining(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_ticket_older_than_the_window_takes_nothing_back() {
        let b = RetryBudget::new(0, 1, WINDOW);
        let old = b.try_retry().expect("first");
        tokio::time::advance(WINDOW).await;
        // The old charge expired; a new one sits in the same bucket of the ring.
        let new = b.try_retry().expect("a new window");
        b.give_back(old);
        assert!(b.try_retry().is_none(), "the new charge still counts");
        b.give_back(new);
        assert_eq!(b.remaining(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_answered_in_the_end_gives_back_all_its_retries() {
        let b = RetryBudget::new(0, 3, WINDOW);
        let mut r = RequestRetries::default();
        r.start_try(); // the first try
        for _ in 0..2 {
            r.admitted(b.try_retry().expect("admitted"));
            r.start_try();
        }
        assert_eq!(b.remaining(), 1, "two retries in flight");
        assert_eq!(r.answered(&b), 2);
        assert_eq!(b.remaining(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_failing_anyway_keeps_its_retries_charged() {
        let b = RetryBudget::new(0, 3, WINDOW);
        let mut r = RequestRetries::default();
        r.start_try();
        r.admitted(b.try_retry().expect("admitted"));
        r.start_try();
        // This retry could not connect: given back.
        assert_eq!(r.not_connected(&b), 1);
        r.admitted(b.try_retry().expect("admitted"));
        r.start_try();
        // A third retry admitted, never started (the request ended first): given back.
        r.admitted(b.try_retry().expect("admitted"));
        assert_eq!(r.finish(&b), 1);
        drop(r);
        assert_eq!(
            b.remaining(),
            2,
            "the one retry that reached a server and failed"
        );
    }

    #[test]
    fn concurrent_retries_never_overshoot() {
        let b = Arc::new(RetryBudget::new(10, 0, Duration::from_secs(3600)));
        for _ in 0..1000 {
            b.record_request();
        }
        let granted: u32 = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| s.spawn(|| (0..100).filter(|_| b.try_retry().is_some()).count() as u32))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or(0)).sum()
        });
        assert_eq!(granted, 100);
    }
}
