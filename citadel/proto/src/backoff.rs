//! Exponential backoff with jitter: the one retry schedule of the project (control reconnects,
//! DERP reconnects, the work queue's Redis outages).
//!
//! Sans-IO and deterministic: [`Backoff::next_delay`] returns how long to wait and never reads
//! a clock; the jitter comes from a small PRNG seeded by the caller, so a fixed seed gives a
//! fixed schedule in tests.

use std::time::Duration;

/// A retry schedule: `initial`, doubling per failure up to `max`, each delay scaled by a
/// random factor in `[jitter_lo, jitter_hi)`.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    jitter_lo: f64,
    jitter_hi: f64,
    /// Base delay of the next failure (before jitter).
    current: Duration,
    failures: u32,
    rng: u64,
}

impl Backoff {
    /// Starts at `initial` and doubles up to `max`, without jitter until [`Backoff::jitter`]
    /// sets it. `max` below `initial` is raised to `initial`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max: max.max(initial),
            jitter_lo: 1.0,
            jitter_hi: 1.0,
            current: initial,
            failures: 0,
            rng: 0,
        }
    }

    /// Scales each delay by a factor drawn from `[lo, hi)`, drawn from a generator seeded with
    /// `seed`. Factors are clamped to be non-negative and ordered.
    pub fn jitter(mut self, lo: f64, hi: f64, seed: u64) -> Self {
        let lo = if lo.is_finite() { lo.max(0.0) } else { 1.0 };
        let hi = if hi.is_finite() { hi.max(lo) } else { lo };
        self.jitter_lo = lo;
        self.jitter_hi = hi;
        self.rng = seed;
        self
    }

    /// The delay before the next attempt after one more failure; the base doubles for the
    /// failure after it.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.current;
        self.current = self.current.saturating_mul(2).min(self.max);
        self.failures = self.failures.saturating_add(1);
        let factor = if self.jitter_hi == self.jitter_lo {
            self.jitter_lo
        } else {
            self.jitter_lo + (self.jitter_hi - self.jitter_lo) * self.next_unit()
        };
        if factor == 1.0 {
            return base;
        }
        // `Duration::mul_f64` panics on overflow; saturate instead.
        Duration::try_from_secs_f64(base.as_secs_f64() * factor).unwrap_or(Duration::MAX)
    }

    /// Starts the schedule over (after a success).
    pub fn reset(&mut self) {
        self.current = self.initial;
        self.failures = 0;
    }

    /// Failures since the last reset.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Base delay (before jitter) the next failure will get.
    pub fn peek_base(&self) -> Duration {
        self.current
    }

    /// A uniform value in `[0, 1)` from splitmix64: a handful of lines, seedable, and plenty
    /// for spreading retries (no cryptographic use).
    fn next_unit(&mut self) -> f64 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn doubles_up_to_the_cap_without_jitter() {
        let mut b = Backoff::new(100 * MS, Duration::from_secs(5));
        let got: Vec<u128> = (0..9).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(got, [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000]);
        assert_eq!(b.failures(), 9);
    }

    #[test]
    fn reset_starts_over() {
        let mut b = Backoff::new(250 * MS, Duration::from_secs(15));
        for _ in 0..5 {
            b.next_delay();
        }
        assert_eq!(b.peek_base(), 8000 * MS);
        b.reset();
        assert_eq!(b.failures(), 0);
        assert_eq!(b.next_delay(), 250 * MS);
    }

    #[test]
    fn jitter_stays_in_range_and_varies() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(1)).jitter(1.0, 1.25, 7);
        let ds: Vec<Duration> = (0..200).map(|_| b.next_delay()).collect();
        assert!(ds.iter().all(|d| *d >= Duration::from_secs(1) && *d < Duration::from_millis(1250)), "{ds:?}");
        let distinct: std::collections::HashSet<_> = ds.iter().collect();
        assert!(distinct.len() > 150, "jitter should spread delays, got {} distinct", distinct.len());
    }

    #[test]
    fn same_seed_same_schedule_other_seed_differs() {
        let run = |seed| {
            let mut b = Backoff::new(100 * MS, Duration::from_secs(30)).jitter(0.5, 1.0, seed);
            (0..10).map(|_| b.next_delay()).collect::<Vec<_>>()
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
        let delays = run(42);
        for (d, base) in delays.iter().zip([100u32, 200, 400, 800]) {
            assert!(*d >= MS * base / 2 && *d < MS * base, "{d:?} vs base {base} ms");
        }
    }

    #[test]
    fn degenerate_settings_do_not_panic() {
        let mut b = Backoff::new(Duration::from_secs(10), Duration::ZERO).jitter(f64::NAN, -3.0, 1);
        assert_eq!(b.next_delay(), Duration::from_secs(10));
        let mut huge = Backoff::new(Duration::MAX / 2, Duration::MAX);
        for _ in 0..4 {
            huge.next_delay();
        }
        assert_eq!(huge.peek_base(), Duration::MAX);
    }
}
