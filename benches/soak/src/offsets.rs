//! What one channel subscriber has received, checked offset by offset
//! against the README's promise: offsets arrive in order, one each; a hole
//! is explained only by a `dropped` notice (and then recovered by a
//! `since` replay) or a `not_recoverable` answer; a repeat is allowed only
//! inside a replay the subscriber asked for.
//!
//! No I/O: the client feeds it what arrived and asks it where to resume.

use std::collections::BTreeSet;

/// Counts for the summary; all of `unexplained_*` must end at 0.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct OffsetStats {
    pub delivered: u64,
    /// Missing offsets never announced by a `dropped` notice.
    pub unexplained_gaps: u64,
    /// Offsets received twice outside a replay.
    pub unexplained_duplicates: u64,
    /// Announced drops that a `since` replay brought back.
    pub recovered: u64,
    /// Announced drops the backlog no longer had (`not_recoverable`).
    pub lost_explained: u64,
    /// Offsets a replay repeated (the README says to de-duplicate them).
    pub replay_repeats: u64,
}

impl OffsetStats {
    pub fn add(&mut self, o: &OffsetStats) {
        self.delivered += o.delivered;
        self.unexplained_gaps += o.unexplained_gaps;
        self.unexplained_duplicates += o.unexplained_duplicates;
        self.recovered += o.recovered;
        self.lost_explained += o.lost_explained;
        self.replay_repeats += o.replay_repeats;
    }
}

#[derive(Debug, Default)]
pub struct OffsetTracker {
    /// The highest offset received (holes below it are in the sets).
    last: u64,
    /// Holes a `dropped` notice announced, not yet replayed.
    missing: BTreeSet<u64>,
    /// Holes seen with no notice yet (a notice may follow the hole).
    unannounced: BTreeSet<u64>,
    /// Ranges a notice announced before the hole showed.
    announced: Vec<(u64, u64)>,
    /// Messages still to come from the replay of the last `subscribe`.
    replay_left: u64,
    /// After a fresh subscription without `since`: the first offset
    /// received sets the start.
    resync: bool,
    stats: OffsetStats,
}

impl OffsetTracker {
    pub fn new() -> Self {
        OffsetTracker {
            resync: true,
            ..Default::default()
        }
    }

    pub fn stats(&self) -> OffsetStats {
        let mut stats = self.stats;
        // Holes never explained by the end count as unexplained.
        stats.unexplained_gaps += self.unannounced.len() as u64;
        stats
    }

    /// The highest offset received.
    pub fn last(&self) -> u64 {
        self.last
    }

    /// Where a new `subscribe` should resume: after the last offset held
    /// without a hole below it; None before anything arrived.
    pub fn resume_after(&self) -> Option<u64> {
        if self.resync && self.last == 0 {
            return None;
        }
        let first_hole = self.missing.iter().chain(&self.unannounced).min();
        Some(first_hole.map_or(self.last, |h| h - 1))
    }

    /// A `subscribe` ack: `replayed` backlog messages come next.
    pub fn on_ack(&mut self, replayed: u64, with_since: bool) {
        self.replay_left = replayed;
        if !with_since {
            self.resync = true;
        }
    }

    pub fn on_message(&mut self, offset: u64) {
        self.stats.delivered += 1;
        let in_replay = self.replay_left > 0;
        if in_replay {
            self.replay_left -= 1;
        }
        if self.resync {
            self.resync = false;
            if self.last == 0 || offset > self.last {
                // Resubscribed after not_recoverable: what lies between
                // was answered as gone.
                if self.last > 0 {
                    self.stats.lost_explained += offset - self.last - 1;
                }
                self.last = offset;
                return;
            }
        }
        if offset <= self.last {
            if self.missing.remove(&offset) {
                self.stats.recovered += 1;
            } else if self.unannounced.remove(&offset) {
                // A replay filled a hole before its notice came: nothing lost.
                self.stats.recovered += 1;
            } else if in_replay {
                self.stats.replay_repeats += 1;
            } else {
                self.stats.unexplained_duplicates += 1;
            }
            return;
        }
        for hole in self.last + 1..offset {
            if self
                .announced
                .iter()
                .any(|(a, b)| (*a..=*b).contains(&hole))
            {
                self.missing.insert(hole);
            } else {
                self.unannounced.insert(hole);
            }
        }
        self.last = offset;
        let last = self.last;
        self.announced.retain(|(_, b)| *b > last);
    }

    /// A `dropped` notice for offsets `first..=last_dropped`.
    pub fn on_dropped(&mut self, first: u64, last_dropped: u64) {
        for offset in first..=last_dropped {
            if self.unannounced.remove(&offset) {
                self.missing.insert(offset);
            }
        }
        if last_dropped > self.last {
            self.announced.push((first, last_dropped));
        }
    }

    /// The server answered that the backlog no longer reaches back to the
    /// holes: every hole so far is lost, and explained by that answer.
    /// `backlog_first`: the oldest offset the backlog still holds, as the
    /// answer says; what lies between the last offset received and it is
    /// lost too, and a replay from there is what the client asks next.
    pub fn on_not_recoverable(&mut self, backlog_first: Option<u64>) {
        self.stats.lost_explained += (self.missing.len() + self.unannounced.len()) as u64;
        self.missing.clear();
        self.unannounced.clear();
        self.announced.clear();
        self.replay_left = 0;
        if let Some(first) = backlog_first {
            if first > self.last + 1 {
                self.stats.lost_explained += first - 1 - self.last;
                self.last = first - 1;
                self.resync = false;
            }
        }
    }

    /// Holes still waiting for a replay.
    pub fn missing(&self) -> usize {
        self.missing.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(t: &mut OffsetTracker, offsets: impl IntoIterator<Item = u64>) {
        for o in offsets {
            t.on_message(o);
        }
    }

    #[test]
    fn in_order_is_clean() {
        let mut t = OffsetTracker::new();
        t.on_ack(0, false);
        feed(&mut t, 5..=9);
        let s = t.stats();
        assert_eq!(s.delivered, 5);
        assert_eq!((s.unexplained_gaps, s.unexplained_duplicates), (0, 0));
        assert_eq!(t.resume_after(), Some(9));
    }

    #[test]
    fn a_hole_without_a_notice_is_unexplained() {
        let mut t = OffsetTracker::new();
        feed(&mut t, [1, 2, 5]);
        assert_eq!(t.stats().unexplained_gaps, 2);
        assert_eq!(t.resume_after(), Some(2));
    }

    #[test]
    fn a_notice_after_the_hole_explains_it_and_a_replay_recovers_it() {
        let mut t = OffsetTracker::new();
        feed(&mut t, [1, 2, 5]);
        t.on_dropped(3, 4);
        assert_eq!(t.missing(), 2);
        assert_eq!(t.resume_after(), Some(2));
        // subscribe since 2: replays 3, 4, 5; then live 6.
        t.on_ack(3, true);
        feed(&mut t, [3, 4, 5, 6]);
        let s = t.stats();
        assert_eq!((s.unexplained_gaps, s.unexplained_duplicates), (0, 0));
        assert_eq!((s.recovered, s.replay_repeats), (2, 1));
        assert_eq!(t.missing(), 0);
    }

    #[test]
    fn a_notice_before_the_hole_explains_it() {
        let mut t = OffsetTracker::new();
        feed(&mut t, [1, 2]);
        t.on_dropped(3, 4);
        feed(&mut t, [5]);
        assert_eq!(t.stats().unexplained_gaps, 0);
        assert_eq!(t.missing(), 2);
    }

    #[test]
    fn a_repeat_outside_a_replay_is_a_duplicate() {
        let mut t = OffsetTracker::new();
        feed(&mut t, [1, 2, 3, 2]);
        assert_eq!(t.stats().unexplained_duplicates, 1);
    }

    #[test]
    fn not_recoverable_counts_the_announced_holes_as_lost() {
        let mut t = OffsetTracker::new();
        feed(&mut t, [1, 4]);
        t.on_dropped(2, 3);
        t.on_not_recoverable(None);
        let s = t.stats();
        assert_eq!((s.lost_explained, s.unexplained_gaps), (2, 0));
        assert_eq!(t.resume_after(), Some(4));
    }

    #[test]
    fn not_recoverable_also_explains_holes_whose_notice_never_came() {
        // The connection was replaced before its `dropped` notice.
        let mut t = OffsetTracker::new();
        feed(&mut t, [1, 5]);
        assert_eq!(t.resume_after(), Some(1));
        t.on_not_recoverable(None);
        t.on_ack(0, false);
        feed(&mut t, [9, 10]);
        let s = t.stats();
        assert_eq!((s.unexplained_gaps, s.lost_explained), (0, 3 + 3));
    }

    #[test]
    fn not_recoverable_with_the_backlog_start_resumes_from_there() {
        // Announced 11..=20 dropped after 10; the backlog now starts at 16.
        let mut t = OffsetTracker::new();
        feed(&mut t, 1..=10);
        t.on_dropped(11, 20);
        t.on_not_recoverable(Some(16));
        assert_eq!(t.resume_after(), Some(15));
        t.on_ack(5, true);
        feed(&mut t, 16..=21);
        let s = t.stats();
        assert_eq!(
            (
                s.unexplained_gaps,
                s.unexplained_duplicates,
                s.lost_explained
            ),
            (0, 0, 5)
        );
        assert_eq!(t.last(), 21);
    }

    #[test]
    fn a_reconnect_resumes_after_the_last_offset() {
        let mut t = OffsetTracker::new();
        feed(&mut t, [7, 8]);
        // New connection: subscribe since 8 replays 9, 10.
        t.on_ack(2, true);
        feed(&mut t, [9, 10, 11]);
        let s = t.stats();
        assert_eq!(
            (
                s.unexplained_gaps,
                s.unexplained_duplicates,
                s.replay_repeats
            ),
            (0, 0, 0)
        );
    }
}
