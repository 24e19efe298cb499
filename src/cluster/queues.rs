//! The two bounded hand-over queues between the event loop and the link's
//! threads.
//!
//! * [`Outbox`]: loop → writer thread. `push` never blocks; it fails when
//!   `capacity` commands are waiting *or in flight* (a batch the writer took
//!   stays counted until Redis has answered it), so the bound is exact.
//! * [`Inbox`]: link threads → loop. Bus messages count against `capacity`;
//!   the reader waits for space (Redis keeps the backlog in the bus stream
//!   meanwhile). Control items (up, down, lost, history answers) are never
//!   refused; there are few of them. The `mio::Waker` is woken when the
//!   inbox goes from empty to non-empty, and `drain` takes everything at
//!   once, so one wake covers whatever arrived before the loop drained.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::inbound::Inbound;
use super::requests::{ScriptCall, ScriptMode, WriteCommand};

/// A request for the writer thread.
#[derive(Debug)]
pub(crate) enum Command {
    Publish {
        id: u64,
        channel: String,
        payload: String,
    },
    /// A channel definition (see `protocol::DEFINE_LUA`): pipelined with
    /// publishes, in the same per-link sequence.
    Define {
        id: u64,
        channel: String,
        definition: String,
    },
    /// The messages after `after_offset`, or (`newest`) the channel's
    /// latest `limit` messages.
    History {
        request: u64,
        channel: String,
        after_offset: u64,
        limit: usize,
        newest: bool,
    },
    /// A script call, answered with Redis's reply under `request`: run on
    /// its own, in order after earlier commands.
    Script {
        request: u64,
        call: ScriptCall,
        mode: ScriptMode,
    },
    /// Idempotent writes, pipelined with neighbouring writes; `what` names
    /// them in the warning when Redis refuses some.
    Writes {
        what: &'static str,
        commands: Vec<WriteCommand>,
    },
}

impl Command {
    /// A request answered with data, run on its own, and failed at once
    /// while Redis is unreachable.
    pub(super) fn is_read(&self) -> bool {
        matches!(
            self,
            Command::History { .. }
                | Command::Script {
                    mode: ScriptMode::Read,
                    ..
                }
        )
    }

    /// Run on its own: a read, or a durable script call (answered too,
    /// but never failed for an outage: Redis must decide it).
    fn is_single(&self) -> bool {
        matches!(self, Command::History { .. } | Command::Script { .. })
    }

    /// Commands of the same batch kind are pipelined together.
    fn same_batch(&self, other: &Command) -> bool {
        let bus = |c: &Command| matches!(c, Command::Publish { .. } | Command::Define { .. });
        let writes = |c: &Command| matches!(c, Command::Writes { .. });
        (bus(self) && bus(other)) || (writes(self) && writes(other))
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking link thread must not take the loop down with it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Default)]
struct OutboxState {
    queue: VecDeque<Command>,
    in_flight: usize,
    writer_waiting: bool,
}

pub(crate) struct Outbox {
    state: Mutex<OutboxState>,
    cond: Condvar,
    capacity: usize,
}

impl Outbox {
    pub fn new(capacity: usize) -> Outbox {
        Outbox {
            state: Mutex::new(OutboxState::default()),
            cond: Condvar::new(),
            capacity: capacity.max(1),
        }
    }

    /// Queues `cmd`, or hands it back when the queue is full.
    pub fn push(&self, cmd: Command) -> Result<(), Command> {
        let mut s = lock(&self.state);
        if s.queue.len() + s.in_flight >= self.capacity {
            return Err(cmd);
        }
        s.queue.push_back(cmd);
        // Notify only a sleeping writer: a condvar notify is a syscall.
        let wake = s.writer_waiting;
        drop(s);
        if wake {
            self.cond.notify_one();
        }
        Ok(())
    }

    /// Waits up to `wait` for work, then moves into `out` either one read
    /// or script call, or a run of up to `max` publishes and definitions,
    /// or of idempotent writes, from the front.
    /// They stay counted against the capacity until [`Outbox::done`].
    pub fn take_batch(
        &self,
        max: usize,
        wait: Duration,
        stop: &AtomicBool,
        out: &mut Vec<Command>,
    ) {
        let deadline = Instant::now() + wait;
        let mut s = lock(&self.state);
        while s.queue.is_empty() && !stop.load(Ordering::Acquire) {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            s.writer_waiting = true;
            s = self
                .cond
                .wait_timeout(s, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
            s.writer_waiting = false;
        }
        let mut n = 0;
        while n < max.max(1) {
            let Some(next) = s.queue.front() else {
                break;
            };
            if n > 0 && (next.is_single() || !out[out.len() - 1].same_batch(next)) {
                break;
            }
            let read = next.is_single();
            out.extend(s.queue.pop_front());
            n += 1;
            if read {
                break;
            }
        }
        s.in_flight += n;
    }

    /// `n` in-flight commands are finished (answered, or given up).
    pub fn done(&self, n: usize) {
        let mut s = lock(&self.state);
        s.in_flight = s.in_flight.saturating_sub(n);
    }

    /// Takes every queued read (to answer them with an error while Redis
    /// is unreachable); writes stay queued.
    pub fn take_reads(&self) -> Vec<Command> {
        let mut s = lock(&self.state);
        if !s.queue.iter().any(Command::is_read) {
            return Vec::new();
        }
        let (reads, writes): (VecDeque<Command>, VecDeque<Command>) =
            s.queue.drain(..).partition(Command::is_read);
        s.queue = writes;
        reads.into()
    }

    /// Takes everything still queued (at shutdown).
    pub fn take_all(&self) -> Vec<Command> {
        let mut s = lock(&self.state);
        s.queue.drain(..).collect()
    }

    /// Sleeps until `deadline`, or less when a command arrives or `stop`
    /// is set (then the caller looks again).
    pub fn sleep_until(&self, deadline: Instant, stop: &AtomicBool) {
        let mut s = lock(&self.state);
        let now = Instant::now();
        if now >= deadline || stop.load(Ordering::Acquire) {
            return;
        }
        s.writer_waiting = true;
        s = self
            .cond
            .wait_timeout(s, deadline - now)
            .map(|(g, _)| g)
            .unwrap_or_else(|e| e.into_inner().0);
        s.writer_waiting = false;
    }

    /// Wakes the writer (shutdown).
    pub fn wake(&self) {
        let _s = lock(&self.state);
        self.cond.notify_all();
    }

    /// Commands waiting or in flight.
    pub fn len(&self) -> usize {
        let s = lock(&self.state);
        s.queue.len() + s.in_flight
    }
}

#[derive(Default)]
struct InboxState {
    items: VecDeque<Inbound>,
    messages: usize,
}

pub(crate) struct Inbox {
    state: Mutex<InboxState>,
    /// Bus messages ever queued.
    messages_in: AtomicU64,
    space: Condvar,
    capacity: usize,
    waker: Arc<mio::Waker>,
}

impl Inbox {
    pub fn new(capacity: usize, waker: Arc<mio::Waker>) -> Inbox {
        Inbox {
            state: Mutex::new(InboxState::default()),
            messages_in: AtomicU64::new(0),
            space: Condvar::new(),
            capacity: capacity.max(1),
            waker,
        }
    }

    fn wake(&self) {
        if let Err(e) = self.waker.wake() {
            log::debug!("redis link: waking the event loop failed: {e}");
        }
    }

    /// Queues a control item (never refused).
    pub fn push_control(&self, item: Inbound) {
        let mut s = lock(&self.state);
        let was_empty = s.items.is_empty();
        s.items.push_back(item);
        drop(s);
        if was_empty {
            self.wake();
        }
    }

    /// Queues `items` in order (bus messages count against the capacity,
    /// anything else does not), waiting for the loop to make space. Answers
    /// how many were queued: fewer than `items.len()` only when `stop` was
    /// set while waiting.
    pub fn push_messages(&self, items: &mut VecDeque<Inbound>, stop: &AtomicBool) -> usize {
        let mut queued = 0;
        let mut s = lock(&self.state);
        loop {
            let was_empty = s.items.is_empty();
            while let Some(item) = items.front() {
                let is_message =
                    matches!(item, Inbound::Message { .. } | Inbound::Definition { .. });
                if is_message && s.messages >= self.capacity {
                    break;
                }
                s.items.extend(items.pop_front());
                s.messages += usize::from(is_message);
                if is_message {
                    self.messages_in.fetch_add(1, Ordering::Relaxed);
                }
                queued += 1;
            }
            let wake = was_empty && !s.items.is_empty();
            if wake {
                drop(s);
                self.wake();
                s = lock(&self.state);
            }
            if items.is_empty() || stop.load(Ordering::Acquire) {
                return queued;
            }
            // Full: wait for a drain (bounded, to notice `stop`).
            if s.messages >= self.capacity {
                s = self
                    .space
                    .wait_timeout(s, Duration::from_millis(100))
                    .map(|(g, _)| g)
                    .unwrap_or_else(|e| e.into_inner().0);
            }
        }
    }

    /// Everything queued, oldest first.
    pub fn drain(&self) -> VecDeque<Inbound> {
        let mut s = lock(&self.state);
        let was_full = s.messages >= self.capacity;
        s.messages = 0;
        let items = std::mem::take(&mut s.items);
        drop(s);
        if was_full {
            self.space.notify_all();
        }
        items
    }

    /// Wakes a reader waiting for space (shutdown).
    pub fn release(&self) {
        let _s = lock(&self.state);
        self.space.notify_all();
    }

    pub fn len(&self) -> usize {
        lock(&self.state).messages
    }

    /// Bus messages ever queued for the loop.
    pub fn messages_in(&self) -> u64 {
        self.messages_in.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mio::{Events, Poll, Token, Waker};

    fn publish(id: u64) -> Command {
        Command::Publish {
            id,
            channel: "c".into(),
            payload: String::new(),
        }
    }

    fn history(request: u64) -> Command {
        Command::History {
            request,
            channel: "c".into(),
            after_offset: 0,
            limit: 1,
            newest: false,
        }
    }

    fn message(offset: u64) -> Inbound {
        Inbound::Message {
            channel: "c".into(),
            offset,
            origin: "a".into(),
            origin_seq: offset,
            payload: String::new(),
        }
    }

    #[test]
    fn outbox_bound_counts_in_flight() {
        let stop = AtomicBool::new(false);
        let o = Outbox::new(3);
        for i in 0..3 {
            assert!(o.push(publish(i)).is_ok());
        }
        assert!(o.push(publish(9)).is_err());
        let mut batch = Vec::new();
        o.take_batch(2, Duration::ZERO, &stop, &mut batch);
        assert_eq!(batch.len(), 2);
        // Two in flight, one queued: still full.
        assert_eq!(o.len(), 3);
        assert!(o.push(publish(9)).is_err());
        o.done(2);
        assert!(o.push(publish(3)).is_ok());
        assert!(o.push(publish(4)).is_ok());
        assert!(o.push(publish(5)).is_err());
    }

    #[test]
    fn outbox_batches_stop_at_history() {
        let stop = AtomicBool::new(false);
        let o = Outbox::new(10);
        for c in [publish(1), publish(2), history(7), publish(3)] {
            o.push(c).unwrap();
        }
        let mut b = Vec::new();
        o.take_batch(10, Duration::ZERO, &stop, &mut b);
        assert!(matches!(
            b[..],
            [
                Command::Publish { id: 1, .. },
                Command::Publish { id: 2, .. }
            ]
        ));
        o.done(b.len());
        b.clear();
        o.take_batch(10, Duration::ZERO, &stop, &mut b);
        assert!(matches!(b[..], [Command::History { request: 7, .. }]));
        o.done(1);
        b.clear();
        o.take_batch(10, Duration::ZERO, &stop, &mut b);
        assert!(matches!(b[..], [Command::Publish { id: 3, .. }]));
    }

    #[test]
    fn outbox_batches_definitions_with_publishes_in_order() {
        let stop = AtomicBool::new(false);
        let o = Outbox::new(10);
        let define = Command::Define {
            id: 2,
            channel: "c".into(),
            definition: "{}".into(),
        };
        for c in [publish(1), define, publish(3), history(4)] {
            o.push(c).unwrap();
        }
        let mut b = Vec::new();
        o.take_batch(10, Duration::ZERO, &stop, &mut b);
        assert!(matches!(
            b[..],
            [
                Command::Publish { id: 1, .. },
                Command::Define { id: 2, .. },
                Command::Publish { id: 3, .. }
            ]
        ));
    }

    /// Idempotent writes; `tag` is the first word, to tell them apart.
    fn writes(tag: u64) -> Command {
        Command::Writes {
            what: "test write(s)",
            commands: vec![vec![tag.to_string()]],
        }
    }

    fn tag_of(c: &Command) -> Option<u64> {
        match c {
            Command::Writes { commands, .. } => commands[0][0].parse().ok(),
            _ => None,
        }
    }

    fn script(request: u64, mode: ScriptMode) -> Command {
        Command::Script {
            request,
            call: ScriptCall {
                script: crate::cluster::LuaScript::new("return 1"),
                keys: vec!["k".into()],
                args: Vec::new(),
            },
            mode,
        }
    }

    #[test]
    fn outbox_batches_writes_apart_and_scripts_alone() {
        let stop = AtomicBool::new(false);
        let o = Outbox::new(10);
        let read = script(9, ScriptMode::Read);
        for c in [writes(1), writes(2), publish(3), read, writes(4)] {
            o.push(c).unwrap();
        }
        let mut b = Vec::new();
        let take = |b: &mut Vec<Command>| next_batch(&o, &stop, b);
        take(&mut b);
        assert_eq!(b.iter().map(tag_of).collect::<Vec<_>>(), [Some(1), Some(2)]);
        take(&mut b);
        assert!(matches!(b[..], [Command::Publish { id: 3, .. }]));
        take(&mut b);
        assert!(matches!(b[..], [Command::Script { request: 9, .. }]));
        take(&mut b);
        assert_eq!(b.iter().map(tag_of).collect::<Vec<_>>(), [Some(4)]);
    }

    /// The next batch the writer would take into `b`, marked done.
    fn next_batch(o: &Outbox, stop: &AtomicBool, b: &mut Vec<Command>) {
        b.clear();
        o.take_batch(10, Duration::ZERO, stop, b);
        o.done(b.len());
    }

    #[test]
    fn durable_scripts_run_alone_and_survive_an_outage() {
        let stop = AtomicBool::new(false);
        let o = Outbox::new(10);
        let durable = script(3, ScriptMode::Durable);
        let read = script(6, ScriptMode::Read);
        for c in [writes(1), durable, writes(2), history(5), read] {
            o.push(c).unwrap();
        }
        // Reads are failed during an outage; a durable call waits for Redis.
        let reads = o.take_reads();
        assert!(matches!(
            reads[..],
            [
                Command::History { request: 5, .. },
                Command::Script { request: 6, .. }
            ]
        ));
        let mut b = Vec::new();
        let take = |b: &mut Vec<Command>| next_batch(&o, &stop, b);
        take(&mut b);
        assert_eq!(b.iter().map(tag_of).collect::<Vec<_>>(), [Some(1)]);
        take(&mut b);
        assert!(matches!(
            b[..],
            [Command::Script {
                request: 3,
                mode: ScriptMode::Durable,
                ..
            }]
        ));
        take(&mut b);
        assert_eq!(b.iter().map(tag_of).collect::<Vec<_>>(), [Some(2)]);
        take(&mut b);
        assert!(b.is_empty());
    }

    #[test]
    fn outbox_take_history_keeps_publishes_in_order() {
        let o = Outbox::new(10);
        for c in [publish(1), history(5), publish(2), history(6)] {
            o.push(c).unwrap();
        }
        let h = o.take_reads();
        assert!(matches!(
            h[..],
            [
                Command::History { request: 5, .. },
                Command::History { request: 6, .. }
            ]
        ));
        let rest = o.take_all();
        assert!(matches!(
            rest[..],
            [
                Command::Publish { id: 1, .. },
                Command::Publish { id: 2, .. }
            ]
        ));
    }

    #[test]
    fn outbox_wait_is_bounded_and_wakes_on_push() {
        let stop = AtomicBool::new(false);
        let o = Arc::new(Outbox::new(10));
        let t = Instant::now();
        let mut b = Vec::new();
        o.take_batch(10, Duration::from_millis(30), &stop, &mut b);
        assert!(b.is_empty());
        assert!(t.elapsed() >= Duration::from_millis(30));
        let o2 = o.clone();
        let pusher = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            o2.push(publish(1)).unwrap();
        });
        let t = Instant::now();
        o.take_batch(10, Duration::from_secs(10), &stop, &mut b);
        assert_eq!(b.len(), 1);
        assert!(t.elapsed() < Duration::from_secs(5));
        pusher.join().unwrap();
    }

    fn waker() -> (Poll, Arc<Waker>) {
        let poll = Poll::new().unwrap();
        let waker = Arc::new(Waker::new(poll.registry(), Token(7)).unwrap());
        (poll, waker)
    }

    fn woken(poll: &mut Poll) -> bool {
        let mut events = Events::with_capacity(4);
        poll.poll(&mut events, Some(Duration::from_millis(0)))
            .unwrap();
        events.iter().any(|e| e.token() == Token(7))
    }

    #[test]
    fn inbox_wakes_on_empty_to_non_empty_only() {
        let (mut poll, w) = waker();
        let stop = AtomicBool::new(false);
        let inbox = Inbox::new(10, w);
        inbox.push_control(Inbound::Up);
        assert!(woken(&mut poll));
        let mut batch: VecDeque<Inbound> = (1..=3).map(message).collect();
        assert_eq!(inbox.push_messages(&mut batch, &stop), 3);
        // Not empty before: no second wake.
        assert!(!woken(&mut poll));
        let got: Vec<Inbound> = inbox.drain().into();
        assert_eq!(got.len(), 4);
        assert!(matches!(got[0], Inbound::Up));
        assert!(matches!(got[3], Inbound::Message { offset: 3, .. }));
        let mut batch: VecDeque<Inbound> = [message(4)].into();
        inbox.push_messages(&mut batch, &stop);
        assert!(woken(&mut poll));
    }

    #[test]
    fn inbox_full_waits_for_drain_and_control_bypasses() {
        let (_poll, w) = waker();
        let stop = Arc::new(AtomicBool::new(false));
        let inbox = Arc::new(Inbox::new(2, w));
        let (i2, s2) = (inbox.clone(), stop.clone());
        let reader = std::thread::spawn(move || {
            let mut batch: VecDeque<Inbound> = (1..=5).map(message).collect();
            i2.push_messages(&mut batch, &s2)
        });
        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while seen.len() < 5 && Instant::now() < deadline {
            assert!(inbox.len() <= 2);
            inbox.push_control(Inbound::Down { reason: "x".into() });
            for item in inbox.drain() {
                if let Inbound::Message { offset, .. } = item {
                    seen.push(offset);
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(reader.join().unwrap(), 5);
        assert_eq!(seen, vec![1, 2, 3, 4, 5]);
    }

    #[test]
    fn inbox_stop_ends_a_full_wait() {
        let (_poll, w) = waker();
        let stop = Arc::new(AtomicBool::new(false));
        let inbox = Arc::new(Inbox::new(1, w));
        let (i2, s2) = (inbox.clone(), stop.clone());
        let reader = std::thread::spawn(move || {
            let mut batch: VecDeque<Inbound> = (1..=3).map(message).collect();
            i2.push_messages(&mut batch, &s2)
        });
        std::thread::sleep(Duration::from_millis(50));
        stop.store(true, Ordering::Release);
        inbox.release();
        assert_eq!(reader.join().unwrap(), 1);
    }
}
