//! The link's state as a whole ([`LinkState`]: connecting, up, down,
//! stopped) built from the state of its two connections, and its counters
//! ([`LinkStats`]). Both threads and the loop's handle read and write it,
//! through [`Shared`](super::shared::Shared).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The link as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// Started, not connected yet.
    Connecting,
    /// Both connections up.
    Up,
    /// An outage: at least one connection is down and reconnecting.
    Down,
    /// Shut down.
    Stopped,
}

/// Counters and gauges of a link (all since `start`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkStats {
    pub state: LinkState,
    /// Publishes Redis applied (each once, resends included).
    pub published: u64,
    /// Channel definitions Redis applied (recorded or found there already).
    pub defined: u64,
    /// Bus messages handed to the loop.
    pub received: u64,
    pub lost_queue_full: u64,
    pub lost_rejected: u64,
    pub lost_bus_gap: u64,
    /// Publishes and definitions still queued when `shutdown` gave up.
    pub lost_at_shutdown: u64,
    /// Bus entries that were not fanout messages (skipped).
    pub malformed: u64,
    /// Resends after an ambiguous failure that Redis had already applied
    /// (and skipped; they are counted in `published` once).
    pub duplicates: u64,
    /// History requests answered (with entries or an error).
    pub history_answered: u64,
    /// Idempotent writes ([`RedisLink::write`](super::RedisLink::write))
    /// and durable script calls that did not fit the outbound queue, plus
    /// write commands Redis refused: what they would have written is not
    /// in Redis.
    pub writes_lost: u64,
    /// Publishes and history requests waiting or in flight.
    pub outbound_queued: usize,
    /// Bus messages waiting for `drain`.
    pub inbound_queued: usize,
    /// Age of the newest bus entry the reader got, by this host's clock
    /// against Redis's (0 when the reader is caught up).
    pub lag_ms: u64,
    /// Connections established after the first one of each thread.
    pub reconnects: u64,
    pub connect_failures: u64,
    /// Outages (`Down` transitions).
    pub outages: u64,
    /// Redis data resets seen (`Reset`).
    pub resets: u64,
    /// Length of the current outage (0 when up).
    pub down_ms: u64,
    /// Total time spent down, the current outage included.
    pub down_total_ms: u64,
}

#[derive(Default)]
pub(super) struct Counters {
    pub(super) published: AtomicU64,
    pub(super) defined: AtomicU64,
    pub(super) lost_queue_full: AtomicU64,
    pub(super) lost_rejected: AtomicU64,
    pub(super) lost_bus_gap: AtomicU64,
    pub(super) lost_at_shutdown: AtomicU64,
    pub(super) malformed: AtomicU64,
    pub(super) duplicates: AtomicU64,
    pub(super) history_answered: AtomicU64,
    pub(super) writes_lost: AtomicU64,
    pub(super) lag_ms: AtomicU64,
    pub(super) reconnects: AtomicU64,
    pub(super) connect_failures: AtomicU64,
}

pub(super) fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Side {
    Writer,
    Reader,
}

impl Side {
    /// For logs: "redis writer: ...".
    pub(super) fn name(self) -> &'static str {
        match self {
            Side::Writer => "writer",
            Side::Reader => "reader",
        }
    }
}

pub(super) struct Status {
    pub(super) writer_up: bool,
    pub(super) reader_up: bool,
    pub(super) state: LinkState,
    pub(super) epoch: Option<String>,
    /// Bumped whenever the epoch in Redis changed (a data reset).
    pub(super) epoch_gen: u64,
    pub(super) outages: u64,
    pub(super) resets: u64,
    pub(super) down_since: Option<Instant>,
    pub(super) down_total: Duration,
}

pub(super) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
