//! Exponential reconnect backoff with a little jitter, between a minimum and
//! a maximum delay.

use std::time::Duration;

use super::protocol::Jitter;

/// Each delay is the current step minus up to a quarter of it (so that
/// nodes that lost Redis together do not reconnect in lockstep), never
/// below `min`; the step doubles after each delay up to `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    step: Duration,
    jitter: Jitter,
}

impl Backoff {
    /// `min` is raised to 1 ms and `max` to `min`.
    pub fn new(min: Duration, max: Duration, seed: u64) -> Backoff {
        let min = min.max(Duration::from_millis(1));
        let max = max.max(min);
        Backoff {
            min,
            max,
            step: min,
            jitter: Jitter::new(seed),
        }
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let step = self.step;
        let quarter = u64::try_from(step.as_micros() / 4).unwrap_or(u64::MAX);
        let cut = if quarter == 0 {
            0
        } else {
            self.jitter.next_u64() % quarter
        };
        self.step = step.saturating_mul(2).min(self.max);
        step.saturating_sub(Duration::from_micros(cut))
            .max(self.min)
    }

    /// After a successful connection: start again from `min`.
    pub fn reset(&mut self) {
        self.step = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_within_bounds_and_resets() {
        let min = Duration::from_millis(100);
        let max = Duration::from_secs(2);
        let mut b = Backoff::new(min, max, 42);
        let delays: Vec<Duration> = (0..12).map(|_| b.next_delay()).collect();
        for d in &delays {
            assert!(*d >= min && *d <= max, "{d:?}");
        }
        // The envelope grows: 100, 200, 400, 800, 1600, 2000, 2000, ...
        assert!(delays[0] <= Duration::from_millis(100));
        assert!(delays[3] > Duration::from_millis(600));
        assert!(delays[4] > Duration::from_millis(1200));
        assert!(delays[11] > Duration::from_millis(1500));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn degenerate_bounds() {
        let mut b = Backoff::new(Duration::ZERO, Duration::ZERO, 1);
        assert_eq!(b.next_delay(), Duration::from_millis(1));
        let mut b = Backoff::new(Duration::from_secs(3), Duration::from_secs(1), 1);
        for _ in 0..5 {
            let d = b.next_delay();
            assert!(d == Duration::from_secs(3), "{d:?}");
        }
    }

    #[test]
    fn jitter_spreads_nodes() {
        let min = Duration::from_millis(400);
        let max = Duration::from_secs(10);
        let mut a = Backoff::new(min, max, 1);
        let mut b = Backoff::new(min, max, 2);
        let (a, b): (Vec<_>, Vec<_>) = (0..6).map(|_| (a.next_delay(), b.next_delay())).unzip();
        assert_ne!(a, b);
    }
}
