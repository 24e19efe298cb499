//! Deadlines for the loop: a min-heap of (when, what). Entries are never
//! removed early; the owner checks on expiry whether the entry is still
//! the one it is waiting for, so rescheduling costs one push.
//!
//! Times are [`Tick`]s, milliseconds since the loop started, half the size
//! of an `Instant`: every connection keeps a few of them and has an entry
//! in the heap, so they count in the memory an idle connection costs.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
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

/// What a deadline is for: a connection, named by slab key and the serial
/// number it was given so an entry for a closed connection never fires on
/// its successor, or (serial 0) a listener whose accepting resumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct TimerKey {
    token: u32,
    serial: u32,
}

/// A decoded [`TimerKey`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timer {
    Connection {
        token: usize,
        serial: u32,
    },
    /// Retry accepting on a listener after the process ran out of fds.
    ResumeAccept {
        listener: usize,
    },
}

impl TimerKey {
    /// `serial` is never 0 (see [`next_serial`]); tokens fit in 32 bits
    /// because they are bounded by the number of open descriptors.
    pub fn connection(token: usize, serial: u32) -> Self {
        debug_assert!(serial != 0);
        Self {
            token: token as u32,
            serial,
        }
    }

    pub fn resume_accept(listener: usize) -> Self {
        Self {
            token: listener as u32,
            serial: 0,
        }
    }

    pub fn decode(self) -> Timer {
        match self.serial {
            0 => Timer::ResumeAccept {
                listener: self.token as usize,
            },
            serial => Timer::Connection {
                token: self.token as usize,
                serial,
            },
        }
    }
}

/// The serial after `previous`, skipping 0 (reserved for listeners).
pub fn next_serial(previous: u32) -> u32 {
    previous.checked_add(1).unwrap_or(1)
}

#[derive(Debug, Default)]
pub struct Timers {
    heap: BinaryHeap<Reverse<(Tick, TimerKey)>>,
}

impl Timers {
    pub fn schedule(&mut self, at: Tick, key: TimerKey) {
        self.heap.push(Reverse((at, key)));
    }

    /// The earliest deadline in the heap.
    pub fn next(&self) -> Option<Tick> {
        self.heap.peek().map(|Reverse((at, _))| *at)
    }

    /// Removes and returns the next entry that is due.
    pub fn pop_due(&mut self, now: Tick) -> Option<(Tick, Timer)> {
        match self.heap.peek() {
            Some(Reverse((at, _))) if *at <= now => {
                self.heap.pop().map(|Reverse((at, key))| (at, key.decode()))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pops_in_deadline_order_and_only_when_due() {
        let clock = Clock::new(Instant::now());
        let start = clock.tick(Instant::now());
        let mut timers = Timers::default();
        let key = |token| TimerKey::connection(token, 1);
        timers.schedule(start.after(Duration::from_secs(3)), key(3));
        timers.schedule(start.after(Duration::from_secs(1)), key(1));
        timers.schedule(start.after(Duration::from_secs(2)), key(2));
        assert_eq!(timers.next(), Some(start.after(Duration::from_secs(1))));
        assert_eq!(timers.pop_due(start), None);
        let later = start.after(Duration::from_secs(2));
        let token = |t| Timer::Connection {
            token: t,
            serial: 1,
        };
        assert_eq!(timers.pop_due(later).map(|e| e.1), Some(token(1)));
        assert_eq!(timers.pop_due(later).map(|e| e.1), Some(token(2)));
        assert_eq!(timers.pop_due(later), None);
        assert_eq!(timers.heap.len(), 1);
    }

    #[test]
    fn keys_round_trip_and_serials_skip_zero() {
        assert_eq!(
            TimerKey::connection(7, 9).decode(),
            Timer::Connection {
                token: 7,
                serial: 9
            }
        );
        assert_eq!(
            TimerKey::resume_accept(2).decode(),
            Timer::ResumeAccept { listener: 2 }
        );
        assert_eq!(next_serial(u32::MAX), 1);
        assert_eq!(std::mem::size_of::<(Tick, TimerKey)>(), 16);
    }

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
