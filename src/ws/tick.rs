//! Time for the sans-IO code and the loop: a [`Tick`] is a moment in whole
//! milliseconds since the loop's [`Clock`] started, half the size of an
//! `Instant`. Sessions keep their deadlines as ticks, and the caller passes
//! the current tick in: nothing here reads a clock by itself.

use std::num::NonZeroU64;
use std::time::{Duration, Instant};

/// A moment, in whole milliseconds since the loop's [`Clock`] started.
/// The current time rounds down and a deadline is at least one whole
/// millisecond more than its duration after it, so nothing fires before
/// its full duration has passed (and at most 2 ms after).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Tick(NonZeroU64);

impl Tick {
    /// A deadline `d` after `self` (a rounded-down current time): the
    /// duration rounded up, plus the millisecond `self` may have lost.
    pub fn after(self, d: Duration) -> Tick {
        let ms = d.as_nanos().div_ceil(1_000_000) + 1;
        let ms = u64::try_from(ms).unwrap_or(u64::MAX);
        Tick(self.0.saturating_add(ms))
    }

    fn millis(self) -> u64 {
        self.0.get() - 1
    }
}

/// Converts between `Instant` and [`Tick`].
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    epoch: Instant,
}

impl Clock {
    pub fn new(epoch: Instant) -> Self {
        Self { epoch }
    }

    /// `now`, rounded down to the millisecond.
    pub fn tick(&self, now: Instant) -> Tick {
        let ms = now.saturating_duration_since(self.epoch).as_millis();
        let ms = u64::try_from(ms).unwrap_or(u64::MAX - 1);
        Tick(NonZeroU64::MIN.saturating_add(ms))
    }

    pub fn instant(&self, tick: Tick) -> Instant {
        self.epoch + Duration::from_millis(tick.millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_round_deadlines_up_and_now_down() {
        let epoch = Instant::now();
        let clock = Clock::new(epoch);
        let now = clock.tick(epoch + Duration::from_micros(2500));
        assert_eq!(clock.instant(now), epoch + Duration::from_millis(2));
        // Real now is 2.5 ms; due no earlier than 4 ms.
        let deadline = now.after(Duration::from_micros(1500));
        assert_eq!(clock.instant(deadline), epoch + Duration::from_millis(5));
        assert!(clock.tick(epoch + Duration::from_micros(4999)) < deadline);
        assert!(clock.tick(epoch + Duration::from_millis(5)) >= deadline);
    }
}
