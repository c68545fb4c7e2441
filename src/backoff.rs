//! Capped exponential backoff with full-range jitter, for every reconnect and restart loop.

use std::time::Duration;

/// An attempt that ran this long before failing counts as a fresh start.
const STABLE_AFTER: Duration = Duration::from_secs(60);

/// Failure count of one retry loop.
#[derive(Debug, Default, Clone)]
pub struct Backoff {
    failures: u32,
}

impl Backoff {
    /// No failures yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a failure of an attempt that ran for `ran_for` and returns how long to wait:
    /// 250 ms doubling up to 30 s, scaled by a random factor in [0.5, 1).
    pub fn next_delay(&mut self, ran_for: Duration) -> Duration {
        if ran_for > STABLE_AFTER {
            self.failures = 0;
        }
        self.failures += 1;
        let cap =
            Duration::from_secs(30).min(Duration::from_millis(250u64 << self.failures.min(8)));
        cap.mul_f64(0.5 + rand::random::<f64>() / 2.0)
    }

    /// Consecutive failures so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_a_cap_and_resets_after_a_stable_run() {
        let mut b = Backoff::new();
        let first = b.next_delay(Duration::ZERO);
        assert!(first >= Duration::from_millis(250) && first < Duration::from_millis(500));
        for _ in 0..20 {
            assert!(b.next_delay(Duration::ZERO) <= Duration::from_secs(30));
        }
        assert!(b.next_delay(Duration::ZERO) >= Duration::from_secs(15));
        b.next_delay(Duration::from_secs(61));
        assert_eq!(b.failures(), 1);
    }
}
