//! A sink's counters, shared by the loop (which offers and drops) and the
//! worker (which sends, retries, fails): atomics, read for `/metrics`.

use std::sync::atomic::AtomicU64;

#[derive(Debug, Default)]
pub struct Counters {
    /// Delivered (a 2xx answer).
    pub sent: AtomicU64,
    /// Attempts after an item's first.
    pub retried: AtomicU64,
    /// Given up on: refused, or out of attempts.
    pub failed: AtomicU64,
    /// Not queued: the queue was full.
    pub dropped_queue_full: AtomicU64,
    /// Not delivered by the flush deadline at shutdown.
    pub dropped_shutdown: AtomicU64,
    /// In the queue now (taken items not counted).
    pub queued: AtomicU64,
}
