//! Pacing arithmetic: a token bucket in its GCRA form (one "theoretical arrival time" instead of
//! a token count), so that one reservation is one subtraction and a comparison.
//!
//! `rate` bytes per second flow on average; up to `burst` bytes may go at once after a quiet
//! spell. A reservation of `n` bytes returns how long the caller must wait before sending them;
//! the bytes are accounted at once, so concurrent callers sharing one pacer queue up behind each
//! other in reservation order and together never exceed the rate.
//!
//! Pure: the clock is a parameter (tests drive it with tokio's paused clock). Never panics:
//! a zero rate means "not paced", durations saturate.

use std::time::Duration;
use tokio::time::Instant;

/// The longest single wait a reservation may ask for; a larger computed wait (absurd rates)
/// is clamped so that a response can never hang on arithmetic.
pub const MAX_WAIT: Duration = Duration::from_secs(3600);

#[derive(Debug, Default, Clone, Copy)]
pub struct Pacer {
    /// When the bucket will be full again if nothing more is sent; `None` = full now.
    tat: Option<Instant>,
    /// The rate `tat` was reckoned at (bytes/s).
    rate: u64,
}

fn secs(bytes: u64, rate: u64) -> Duration {
    Duration::try_from_secs_f64(bytes as f64 / rate as f64).unwrap_or(MAX_WAIT)
}

impl Pacer {
    /// The rate changed (a new share of `total_rate`, another download of the client): the
    /// bytes still owed stay owed, and drain at the new rate. Without this, a client whose
    /// rate went up would keep waiting out its debt at the old, lower rate; it would then use
    /// less than it was given, and be given less at the next measurement.
    fn rescale(&mut self, now: Instant, rate: u64) {
        if self.rate == rate {
            return;
        }
        let old = std::mem::replace(&mut self.rate, rate);
        let Some(tat) = self.tat else {
            return;
        };
        if old == 0 || tat <= now {
            return;
        }
        let owed = (tat - now).as_secs_f64() * old as f64;
        let drain = Duration::try_from_secs_f64(owed / rate as f64).unwrap_or(MAX_WAIT);
        self.tat = Some(now + drain.min(MAX_WAIT));
    }

    /// Account `n` bytes sent at `now` at `rate` bytes/s with `burst` bytes of tolerance, and
    /// return how long to wait before sending them. `rate == 0`: no pacing, zero wait.
    pub fn reserve(&mut self, now: Instant, n: u64, rate: u64, burst: u64) -> Duration {
        if rate == 0 {
            return Duration::ZERO;
        }
        self.rescale(now, rate);
        let start = self.tat.map_or(now, |t| t.max(now));
        let tat = start + secs(n, rate).min(MAX_WAIT);
        self.tat = Some(tat);
        let allowed_from = tat.checked_sub(secs(burst, rate)).unwrap_or(now);
        allowed_from.saturating_duration_since(now).min(MAX_WAIT)
    }

    /// Give back `n` bytes reserved at `rate` but never sent (their response ended first), so
    /// that they do not delay later reservations. Never refills past a full bucket.
    pub fn refund(&mut self, now: Instant, n: u64, rate: u64) {
        if rate == 0 {
            return;
        }
        self.rescale(now, rate);
        if let Some(tat) = self.tat {
            let back = tat.checked_sub(secs(n, rate).min(MAX_WAIT)).unwrap_or(now);
            self.tat = (back > now).then_some(back);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tokio::time::advance;

    const KIB: u64 = 1024;

    /// Send `total` bytes in `piece`-byte pieces through `pacer`, sleeping as told; returns
    /// the elapsed (paused-clock) time.
    async fn send(pacer: &mut Pacer, total: u64, piece: u64, rate: u64, burst: u64) -> Duration {
        let t0 = Instant::now();
        let mut sent = 0;
        while sent < total {
            let n = piece.min(total - sent);
            let wait = pacer.reserve(Instant::now(), n, rate, burst);
            advance(wait).await;
            sent += n;
        }
        t0.elapsed()
    }

    #[tokio::test(start_paused = true)]
    async fn the_burst_goes_at_once_then_the_rate_holds() {
        let mut p = Pacer::default();
        // 256 KiB of burst: the first 256 KiB need no wait.
        assert_eq!(
            send(&mut p, 256 * KIB, 16 * KIB, 1024 * KIB, 256 * KIB).await,
            Duration::ZERO
        );
        // The next MiB takes one second at 1 MiB/s.
        let took = send(&mut p, 1024 * KIB, 16 * KIB, 1024 * KIB, 256 * KIB).await;
        assert!(
            took.abs_diff(Duration::from_secs(1)) < Duration::from_millis(2),
            "{took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn long_run_rate_is_the_rate_whatever_the_piece_size() {
        for piece in [1000, 4 * KIB, 16 * KIB, 64 * KIB] {
            let mut p = Pacer::default();
            let took = send(&mut p, 4096 * KIB, piece, 1024 * KIB, 64 * KIB).await;
            let want = Duration::from_secs_f64((4096.0 - 64.0) / 1024.0);
            assert!(
                took.abs_diff(want) < Duration::from_millis(70),
                "piece {piece}: {took:?} vs {want:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn quiet_time_refills_the_burst_but_no_more() {
        let mut p = Pacer::default();
        send(&mut p, 2048 * KIB, 64 * KIB, 1024 * KIB, 128 * KIB).await;
        advance(Duration::from_secs(10)).await;
        // Ten quiet seconds give back the burst only, not ten seconds' worth.
        assert_eq!(
            p.reserve(Instant::now(), 128 * KIB, 1024 * KIB, 128 * KIB),
            Duration::ZERO
        );
        let wait = p.reserve(Instant::now(), 128 * KIB, 1024 * KIB, 128 * KIB);
        assert!(
            wait.abs_diff(Duration::from_millis(125)) < Duration::from_millis(1),
            "{wait:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn two_senders_sharing_a_pacer_split_the_rate() {
        let mut p = Pacer::default();
        let rate = 1024 * KIB;
        // Alternate reservations as two connections would: together the rate, each half.
        let t0 = Instant::now();
        let (mut a, mut b) = (0u64, 0u64);
        let (mut a_ready, mut b_ready) = (t0, t0);
        while a + b < 4096 * KIB {
            let now = a_ready.min(b_ready);
            tokio::time::advance(now.saturating_duration_since(Instant::now())).await;
            if a_ready <= b_ready {
                a_ready = Instant::now() + p.reserve(Instant::now(), 16 * KIB, rate, 0);
                a += 16 * KIB;
            } else {
                b_ready = Instant::now() + p.reserve(Instant::now(), 16 * KIB, rate, 0);
                b += 16 * KIB;
            }
        }
        assert_eq!(a, b);
        let took = t0.elapsed();
        assert!(
            took.abs_diff(Duration::from_secs(4)) < Duration::from_millis(40),
            "{took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_refund_gives_back_unsent_bytes_but_never_more_than_a_full_bucket() {
        let (rate, burst) = (1024 * KIB, 256 * KIB);
        let mut p = Pacer::default();
        // Three pieces reserved back to back (the third would wait half a second).
        for _ in 0..3 {
            p.reserve(Instant::now(), 256 * KIB, rate, burst);
        }
        // The last two were never sent: the next piece waits as if it were the second.
        p.refund(Instant::now(), 512 * KIB, rate);
        let wait = p.reserve(Instant::now(), 256 * KIB, rate, burst);
        assert!(
            wait.abs_diff(Duration::from_millis(250)) < Duration::from_millis(1),
            "{wait:?}"
        );
        // Refunding more than is reserved leaves a full bucket, not credit.
        p.refund(Instant::now(), 64 * 1024 * KIB, rate);
        assert_eq!(
            p.reserve(Instant::now(), 256 * KIB, rate, burst),
            Duration::ZERO
        );
        let wait = p.reserve(Instant::now(), 256 * KIB, rate, burst);
        assert!(
            wait.abs_diff(Duration::from_millis(250)) < Duration::from_millis(1),
            "{wait:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn when_the_rate_changes_what_is_owed_drains_at_the_new_rate() {
        let burst = 64 * KIB;
        let mut p = Pacer::default();
        // Backlogged at 64 KiB/s: a second's worth of bytes owed beyond the burst.
        send(&mut p, 256 * KIB, 16 * KIB, 64 * KIB, burst).await;
        p.reserve(Instant::now(), 64 * KIB, 64 * KIB, burst);
        // At 1 MiB/s the same bytes drain sixteen times faster: the next piece waits for
        // them and itself at the new rate (~78 ms), not the ~2 s left at the old one.
        let wait = p.reserve(Instant::now(), 16 * KIB, 1024 * KIB, burst);
        assert!(wait < Duration::from_millis(100), "{wait:?}");
        // And the long-run rate is the new one.
        let took = send(&mut p, 1024 * KIB, 16 * KIB, 1024 * KIB, burst).await;
        assert!(
            took.abs_diff(Duration::from_secs(1)) < Duration::from_millis(100),
            "{took:?}"
        );
    }

    #[test]
    fn zero_rate_is_not_paced() {
        let mut p = Pacer::default();
        assert_eq!(p.reserve(Instant::now(), u64::MAX, 0, 0), Duration::ZERO);
    }

    proptest! {
        #[test]
        fn never_panics_and_waits_are_bounded(
            ops in proptest::collection::vec((0u64..u64::MAX, 0u64..u64::MAX, 0u64..u64::MAX, 0u64..10_000), 1..50)
        ) {
            let mut p = Pacer::default();
            let base = Instant::now();
            for (n, rate, burst, ms) in ops {
                let now = base + Duration::from_millis(ms);
                let w = p.reserve(now, n, rate, burst);
                prop_assert!(w <= MAX_WAIT);
            }
        }
    }
}
