//! Deadlines for the loop: a min-heap of (when, what). Entries are never
//! removed early; the owner checks on expiry whether the entry is still
//! the one it is waiting for, so rescheduling costs one push.
//!
//! Times are [`Tick`]s (see `ws::tick`): every connection keeps a few of
//! them and has an entry in the heap, so their size counts in the memory
//! an idle connection costs.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

pub use crate::ws::tick::{Clock, Tick};

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
    use std::time::{Duration, Instant};

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
}
