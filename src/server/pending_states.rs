//! One connection's held states: what the server offers the app for
//! state-like fan-out (see `Outbox::deliver_state`). While a slow
//! recipient's queue is full, the latest state per key waits here instead
//! of being dropped; once the queue has room, the loop moves the held
//! states into it, oldest item first within each stream.
//!
//! Which updates are states, and what their keys are, is the app's
//! decision; here a key is only a stream (one subscription) and an item
//! in it. Each stream holds at most a fixed number of items: past it, the
//! oldest item is given up and the caller is told which, so that the
//! client can be told. Frames are shared (reference counted) with every
//! other recipient of the same state, so holding one costs a map entry.
//!
//! Frames are held as the app encoded them: a connection that negotiated
//! permessage-deflate gets them compressed when they are queued, so that
//! a compressor with context takeover sees messages in the order they go
//! out.

use std::collections::BTreeMap;

use crate::app::{StateDelivery, StateKey};
use crate::ws::SharedFrame;

#[derive(Debug, Default)]
pub struct PendingStates {
    /// Stream, then item: iteration order is the order they go out in.
    streams: BTreeMap<u64, BTreeMap<i64, SharedFrame>>,
    /// Items held in all streams.
    len: usize,
}

impl PendingStates {
    /// Holds `frame` as the latest state of `key`, keeping at most
    /// `max_per_stream` items in its stream (at least one: the new one).
    pub fn put(
        &mut self,
        key: StateKey,
        frame: SharedFrame,
        max_per_stream: usize,
    ) -> StateDelivery {
        let items = self.streams.entry(key.stream).or_default();
        if let Some(held) = items.get_mut(&key.item) {
            *held = frame;
            return StateDelivery::Replaced;
        }
        items.insert(key.item, frame);
        self.len += 1;
        if items.len() <= max_per_stream.max(1) {
            return StateDelivery::Held;
        }
        // The oldest item goes: the newest states are the ones a client
        // cannot fetch again from history yet (an open candle), and the
        // oldest are the ones it can.
        let (item, _) = items.pop_first().expect("more items than the bound");
        self.len -= 1;
        StateDelivery::Evicted { item }
    }

    /// The state that goes out next, without taking it.
    pub fn front(&self) -> Option<&SharedFrame> {
        self.streams.values().next()?.values().next()
    }

    /// Takes the state that goes out next.
    pub fn pop_front(&mut self) -> Option<(StateKey, SharedFrame)> {
        let mut stream = self.streams.first_entry()?;
        let (item, frame) = stream.get_mut().pop_first()?;
        let key = StateKey {
            stream: *stream.key(),
            item,
        };
        if stream.get().is_empty() {
            stream.remove();
        }
        self.len -= 1;
        Some((key, frame))
    }

    /// Forgets every state of `stream`; returns how many there were.
    pub fn discard_stream(&mut self, stream: u64) -> usize {
        let gone = self.streams.remove(&stream).map_or(0, |items| items.len());
        self.len -= gone;
        gone
    }

    /// States held, over all streams.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(stream: u64, item: i64) -> StateKey {
        StateKey { stream, item }
    }

    fn text(frame: &SharedFrame) -> &str {
        std::str::from_utf8(frame.payload()).unwrap()
    }

    fn drain(pending: &mut PendingStates) -> Vec<(StateKey, String)> {
        let mut out = Vec::new();
        while let Some(front) = pending.front().map(|f| text(f).to_owned()) {
            let (key, frame) = pending.pop_front().unwrap();
            assert_eq!(text(&frame), front, "front() is what pop_front() takes");
            out.push((key, front));
        }
        out
    }

    #[test]
    fn the_latest_state_per_key_is_kept_in_item_order() {
        let mut pending = PendingStates::default();
        assert_eq!(
            pending.put(key(1, 60), SharedFrame::text("b1"), 10),
            StateDelivery::Held
        );
        assert_eq!(
            pending.put(key(1, 0), SharedFrame::text("a1"), 10),
            StateDelivery::Held
        );
        assert_eq!(
            pending.put(key(1, 60), SharedFrame::text("b2"), 10),
            StateDelivery::Replaced
        );
        assert_eq!(
            pending.put(key(1, 0), SharedFrame::text("a-final"), 10),
            StateDelivery::Replaced
        );
        assert_eq!(pending.len(), 2);
        assert_eq!(
            drain(&mut pending),
            [
                (key(1, 0), "a-final".to_owned()),
                (key(1, 60), "b2".to_owned())
            ]
        );
        assert!(pending.is_empty());
        assert!(pending.pop_front().is_none());
    }

    #[test]
    fn streams_are_independent() {
        let mut pending = PendingStates::default();
        pending.put(key(7, 5), SharedFrame::text("s7"), 1);
        pending.put(key(3, 9), SharedFrame::text("s3"), 1);
        // Same item in another stream: not the same key.
        assert_eq!(
            pending.put(key(3, 5), SharedFrame::text("s3-5"), 2),
            StateDelivery::Held
        );
        assert_eq!(pending.len(), 3);
        assert_eq!(pending.discard_stream(3), 2);
        assert_eq!(pending.discard_stream(3), 0);
        assert_eq!(pending.len(), 1);
        assert_eq!(drain(&mut pending), [(key(7, 5), "s7".to_owned())]);
    }

    #[test]
    fn past_the_bound_the_oldest_item_is_given_up_and_named() {
        let mut pending = PendingStates::default();
        for item in 0..3 {
            let frame = SharedFrame::text(&format!("c{item}"));
            assert_eq!(
                pending.put(key(1, item * 60), frame, 3),
                StateDelivery::Held
            );
        }
        // A replacement never evicts.
        assert_eq!(
            pending.put(key(1, 120), SharedFrame::text("c2'"), 3),
            StateDelivery::Replaced
        );
        assert_eq!(
            pending.put(key(1, 180), SharedFrame::text("c3"), 3),
            StateDelivery::Evicted { item: 0 }
        );
        // Another stream has a bound of its own.
        assert_eq!(
            pending.put(key(2, 0), SharedFrame::text("x"), 3),
            StateDelivery::Held
        );
        assert_eq!(pending.len(), 4);
        let keys: Vec<StateKey> = drain(&mut pending).into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, [key(1, 60), key(1, 120), key(1, 180), key(2, 0)]);
    }

    #[test]
    fn a_bound_of_zero_still_holds_the_newest_state() {
        let mut pending = PendingStates::default();
        assert_eq!(
            pending.put(key(1, 1), SharedFrame::text("a"), 0),
            StateDelivery::Held
        );
        assert_eq!(
            pending.put(key(1, 2), SharedFrame::text("b"), 0),
            StateDelivery::Evicted { item: 1 }
        );
        assert_eq!(drain(&mut pending), [(key(1, 2), "b".to_owned())]);
    }

    #[test]
    fn a_held_frame_is_shared_not_copied() {
        let mut pending = PendingStates::default();
        let frame = SharedFrame::text("candle");
        pending.put(key(1, 1), frame.clone(), 4);
        let (_, held) = pending.pop_front().unwrap();
        assert!(held.same_as(&frame));
    }
}
