//! Deadlines for the loop: a min-heap of (when, what). Entries are never
//! removed early; the owner checks on expiry whether the entry is still
//! the one it is waiting for, so rescheduling costs one push.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

/// What a deadline is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TimerKey {
    /// A connection, named by slab key and the serial number it was given,
    /// so an entry for a closed connection never fires on its successor.
    Connection { token: usize, serial: u64 },
    /// Retry accepting on a listener after the process ran out of fds.
    ResumeAccept { listener: usize },
}

#[derive(Debug, Default)]
pub struct Timers {
    heap: BinaryHeap<Reverse<(Instant, TimerKey)>>,
}

impl Timers {
    pub fn schedule(&mut self, at: Instant, key: TimerKey) {
        self.heap.push(Reverse((at, key)));
    }

    /// How long the loop may sleep before the next deadline.
    pub fn timeout(&self, now: Instant) -> Option<Duration> {
        self.heap
            .peek()
            .map(|Reverse((at, _))| at.saturating_duration_since(now))
    }

    /// Removes and returns the next entry that is due.
    pub fn pop_due(&mut self, now: Instant) -> Option<(Instant, TimerKey)> {
        match self.heap.peek() {
            Some(Reverse((at, _))) if *at <= now => self.heap.pop().map(|Reverse(entry)| entry),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pops_in_deadline_order_and_only_when_due() {
        let start = Instant::now();
        let mut timers = Timers::default();
        let key = |token| TimerKey::Connection { token, serial: 0 };
        timers.schedule(start + Duration::from_secs(3), key(3));
        timers.schedule(start + Duration::from_secs(1), key(1));
        timers.schedule(start + Duration::from_secs(2), key(2));
        assert_eq!(timers.timeout(start), Some(Duration::from_secs(1)));
        assert_eq!(timers.pop_due(start), None);
        let later = start + Duration::from_secs(2);
        assert_eq!(timers.pop_due(later).map(|e| e.1), Some(key(1)));
        assert_eq!(timers.pop_due(later).map(|e| e.1), Some(key(2)));
        assert_eq!(timers.pop_due(later), None);
        assert_eq!(timers.heap.len(), 1);
    }
}
