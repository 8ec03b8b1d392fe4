//! Exponential backoff with "Full Jitter" (AWS Architecture Blog, "Exponential Backoff And
//! Jitter"): the delay before retry `n` is drawn uniformly from `[0, min(max, base * 2^(n-1))]`.
//!
//! Full jitter spreads retries from many clients over the whole interval, so a burst of
//! failures does not turn into synchronised waves of retries against a struggling origin.
//!
//! This module is pure arithmetic: it never sleeps, never reads the clock, never allocates and
//! never panics or overflows, whatever the inputs (zero or huge durations, `max < base`,
//! retry numbers up to `u32::MAX`). Sleeping is the caller's business.

use std::time::Duration;

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// Backoff parameters: `base` is the ceiling for the first retry, `max` caps every ceiling.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
}

impl Backoff {
    /// Upper bound of the delay before retry number `retry` (1 = first retry):
    /// `min(max, base * 2^(retry-1))`, overflow-safe. `retry == 0` is treated like 1.
    /// If `max < base`, every ceiling is `max`.
    pub fn ceiling(&self, retry: u32) -> Duration {
        let shift = retry.saturating_sub(1);
        let base = self.base.as_nanos();
        let max = self.max.as_nanos();
        // `base << shift` fits in a u128 iff base has more than `shift` leading zeros.
        let grown = if base == 0 {
            0
        } else if base.leading_zeros() > shift {
            base << shift
        } else {
            u128::MAX
        };
        from_nanos(grown.min(max))
    }

    /// The delay before retry number `retry`: uniform in `[0, ceiling(retry)]` (both ends
    /// included).
    pub fn delay(&self, retry: u32, rng: &mut impl rand::Rng) -> Duration {
        let ceiling = self.ceiling(retry).as_nanos();
        from_nanos(rng.random_range(0..=ceiling))
    }
}

/// Nanoseconds back to a `Duration`. Callers only pass values `<=` some `Duration::as_nanos()`,
/// so the seconds always fit in a u64; saturate anyway rather than trust that.
fn from_nanos(nanos: u128) -> Duration {
    let secs = u64::try_from(nanos / NANOS_PER_SEC).unwrap_or(u64::MAX);
    // The remainder is < 1e9 and therefore always fits in a u32.
    let sub = u32::try_from(nanos % NANOS_PER_SEC).unwrap_or(0);
    Duration::new(secs, sub)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn ceiling_doubles_then_caps() {
        let b = Backoff {
            base: ms(100),
            max: ms(1000),
        };
        assert_eq!(b.ceiling(1), ms(100));
        assert_eq!(b.ceiling(2), ms(200));
        assert_eq!(b.ceiling(3), ms(400));
        assert_eq!(b.ceiling(4), ms(800));
        assert_eq!(b.ceiling(5), ms(1000));
        assert_eq!(b.ceiling(6), ms(1000));
        assert_eq!(b.ceiling(1000), ms(1000));
    }

    #[test]
    fn retry_zero_is_like_first_retry() {
        let b = Backoff {
            base: ms(100),
            max: ms(1000),
        };
        assert_eq!(b.ceiling(0), b.ceiling(1));
    }

    #[test]
    fn huge_retry_numbers_never_overflow() {
        let b = Backoff {
            base: Duration::MAX,
            max: Duration::MAX,
        };
        assert_eq!(b.ceiling(u32::MAX), Duration::MAX);
        assert_eq!(b.ceiling(1), Duration::MAX);
        let b = Backoff {
            base: Duration::from_nanos(1),
            max: Duration::MAX,
        };
        assert_eq!(b.ceiling(65), from_nanos(1 << 64));
        // Duration::MAX is about 2^93.9 ns.
        assert_eq!(b.ceiling(94), from_nanos(1 << 93));
        assert_eq!(b.ceiling(95), Duration::MAX);
        assert_eq!(b.ceiling(128), Duration::MAX);
        assert_eq!(b.ceiling(129), Duration::MAX);
        assert_eq!(b.ceiling(u32::MAX), Duration::MAX);
        let mut rng = StdRng::seed_from_u64(7);
        assert!(b.delay(u32::MAX, &mut rng) <= Duration::MAX);
    }

    #[test]
    fn max_below_base_caps_everything() {
        let b = Backoff {
            base: ms(500),
            max: ms(100),
        };
        assert_eq!(b.ceiling(1), ms(100));
        assert_eq!(b.ceiling(10), ms(100));
    }

    #[test]
    fn zero_base_means_no_delay() {
        let b = Backoff {
            base: Duration::ZERO,
            max: ms(100),
        };
        let mut rng = StdRng::seed_from_u64(1);
        for retry in [0, 1, 2, 64, 200, u32::MAX] {
            assert_eq!(b.ceiling(retry), Duration::ZERO);
            assert_eq!(b.delay(retry, &mut rng), Duration::ZERO);
        }
    }

    #[test]
    fn delay_is_spread_over_the_interval() {
        // Full jitter: the delays should cover the range, not cluster at the ceiling.
        let b = Backoff {
            base: ms(1000),
            max: ms(1000),
        };
        let mut rng = StdRng::seed_from_u64(42);
        let delays: Vec<Duration> = (0..1000).map(|_| b.delay(1, &mut rng)).collect();
        assert!(delays.iter().any(|d| *d < ms(100)));
        assert!(delays.iter().any(|d| *d > ms(900)));
    }

    fn duration() -> impl Strategy<Value = Duration> {
        prop_oneof![
            (0u64..10_000_000_000).prop_map(Duration::from_nanos),
            (any::<u64>(), 0u32..1_000_000_000).prop_map(|(s, n)| Duration::new(s, n)),
            Just(Duration::ZERO),
            Just(Duration::MAX),
        ]
    }

    proptest! {
        #[test]
        fn delay_within_ceiling(base in duration(), max in duration(), retry in any::<u32>(), seed in any::<u64>()) {
            let b = Backoff { base, max };
            let ceiling = b.ceiling(retry);
            prop_assert!(ceiling <= max);
            let mut rng = StdRng::seed_from_u64(seed);
            let d = b.delay(retry, &mut rng);
            prop_assert!(d <= ceiling);
        }

        #[test]
        fn ceiling_is_monotonic_and_matches_formula(base in duration(), max in duration(), retry in 1u32..200) {
            let b = Backoff { base, max };
            prop_assert!(b.ceiling(retry) <= b.ceiling(retry + 1));
            let expected = 1u32
                .checked_shl(retry - 1)
                .and_then(|factor| base.checked_mul(factor))
                .map_or(max, |d| d.min(max));
            if retry <= 32 {
                prop_assert_eq!(b.ceiling(retry), expected);
            }
        }
    }
}
