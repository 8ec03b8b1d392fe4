//! URLs that just failed on every server: for a while, their requests get one try.
//!
//! When two servers or more answer the same request with 502/503/504 and none answers it, the
//! URL is broken, not the servers (`origin::outcome` charges nobody). Retrying the next request
//! for that URL would only repeat it: each request of a hot broken URL would cost `attempts`
//! origin requests and spend the group's retry budget, which the retries of good URLs need (a
//! request that met an outlier server, a probe of an ejected one). So the URL is remembered for
//! [`FAILING_FOR`]: its requests get one try, whose answer (or failure) is passed on at once,
//! without touching the budget. An answer to the URL (any status but 502/503/504) forgets it at
//! once. A request that is itself finding out (its own tries failed on two servers) goes on
//! trying the rest of the group: only the *next* requests are spared the retries.
//!
//! The memory is a fixed table of [`SLOTS`] words (8 KiB per group, whatever the traffic): a
//! slot holds a fingerprint of the key and the time it expires. A URL that lands in a slot
//! another one holds replaces it; a forgotten URL costs one more round of retries. Keys are
//! hashed with a per-process random key, so a client cannot choose a URL that shares a good
//! one's slot and fingerprint. Lock-free; never allocates after construction, never panics.
//! Time comes from `tokio::time::Instant` (tests run on the paused clock).

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;

/// Slots in the table (a power of two).
pub const SLOTS: usize = 1024;
/// How long a URL stays failing after its last failure on every server.
pub const FAILING_FOR: Duration = Duration::from_secs(10);
/// Expiry times are kept in units of this (32 bits of them: 13 years).
const TICK: Duration = Duration::from_millis(100);

/// The failing URLs of one upstream group.
pub struct FailingUrls {
    hasher: RandomState,
    base: Instant,
    /// `fingerprint << 32 | expiry tick`; 0 is an empty slot.
    slots: Box<[AtomicU64]>,
}

impl std::fmt::Debug for FailingUrls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FailingUrls").finish_non_exhaustive()
    }
}

impl Default for FailingUrls {
    fn default() -> Self {
        FailingUrls::new()
    }
}

/// A URL's place in the table, computed once per request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UrlMark {
    slot: usize,
    fingerprint: u32,
}

impl FailingUrls {
    pub fn new() -> FailingUrls {
        FailingUrls {
            hasher: RandomState::new(),
            base: Instant::now(),
            slots: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Where `key` (the request's cache key) lives in the table.
    pub fn mark(&self, key: &[u8]) -> UrlMark {
        let h = self.hasher.hash_one(key);
        UrlMark {
            slot: (h as usize) & (SLOTS - 1),
            // Never 0, so that an empty slot matches nothing.
            fingerprint: ((h >> 32) as u32).max(1),
        }
    }

    /// Remember that the URL just failed on every server it was tried on.
    pub fn failed_everywhere(&self, m: UrlMark) {
        let until = self.tick_of(Instant::now() + FAILING_FOR);
        if let Some(cell) = self.slots.get(m.slot) {
            cell.store(
                (u64::from(m.fingerprint) << 32) | u64::from(until),
                Ordering::Relaxed,
            );
        }
    }

    /// The URL was answered (any status but 502/503/504): it is not failing everywhere.
    pub fn answered(&self, m: UrlMark) {
        if let Some(cell) = self.slots.get(m.slot) {
            let word = cell.load(Ordering::Relaxed);
            if word != 0 && (word >> 32) as u32 == m.fingerprint {
                // Only this URL's entry: another URL that took the slot since stays.
                let _ = cell.compare_exchange(word, 0, Ordering::Relaxed, Ordering::Relaxed);
            }
        }
    }

    /// Whether the URL failed on every server within the last [`FAILING_FOR`].
    pub fn is_failing(&self, m: UrlMark) -> bool {
        let Some(word) = self.slots.get(m.slot).map(|c| c.load(Ordering::Relaxed)) else {
            return false;
        };
        (word >> 32) as u32 == m.fingerprint && self.tick_of(Instant::now()) < word as u32
    }

    fn tick_of(&self, t: Instant) -> u32 {
        let ticks = t.saturating_duration_since(self.base).as_nanos() / TICK.as_nanos();
        u32::try_from(ticks).unwrap_or(u32::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_url_fails_for_a_while_then_is_retried_again() {
        let f = FailingUrls::new();
        let hot = f.mark(b"/hot");
        let good = f.mark(b"/good");
        assert!(!f.is_failing(hot));
        f.failed_everywhere(hot);
        assert!(f.is_failing(hot));
        assert!(!f.is_failing(good), "only that URL");
        tokio::time::advance(FAILING_FOR - Duration::from_millis(200)).await;
        assert!(f.is_failing(hot));
        tokio::time::advance(Duration::from_millis(300)).await;
        assert!(!f.is_failing(hot), "forgotten after FAILING_FOR");
        // Failing again renews it; an answer forgets it.
        f.failed_everywhere(hot);
        assert!(f.is_failing(hot));
        f.answered(good);
        assert!(f.is_failing(hot), "another URL's answer changes nothing");
        f.answered(hot);
        assert!(!f.is_failing(hot));
    }

    #[tokio::test(start_paused = true)]
    async fn the_table_is_fixed_whatever_the_number_of_urls() {
        let f = FailingUrls::new();
        for i in 0..100_000u32 {
            f.failed_everywhere(f.mark(format!("/u{i}").as_bytes()));
        }
        assert_eq!(f.slots.len(), SLOTS);
        // The last ones are remembered; most of the early ones were replaced.
        let recent = (99_900..100_000u32)
            .filter(|i| f.is_failing(f.mark(format!("/u{i}").as_bytes())))
            .count();
        assert!(recent >= 90, "{recent}");
        // URLs never marked are not failing (a fingerprint of 32 bits tells them apart).
        let false_positives = (0..10_000u32)
            .filter(|i| f.is_failing(f.mark(format!("/other{i}").as_bytes())))
            .count();
        assert_eq!(false_positives, 0);
    }

    #[test]
    fn marks_differ_between_processes_keys() {
        // Two tables (two processes) place the same URL independently.
        let a = FailingUrls::new();
        let b = FailingUrls::new();
        let differ = (0..64u32)
            .filter(|i| {
                let k = format!("/k{i}");
                a.mark(k.as_bytes()) != b.mark(k.as_bytes())
            })
            .count();
        assert!(differ > 32, "{differ}");
    }
}
