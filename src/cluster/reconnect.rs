//! Reconnecting, written once for both link threads: the backoff wait
//! while down, the book-keeping of an attempt (reconnect and failure
//! counts, the link's up/down state), and the single immediate retry
//! after a broken connection (a stale connection after a quick Redis
//! restart is not an outage). Each thread supplies only what differs:
//! how it sets up a new connection and what it does while it waits.

use std::time::Instant;

use redis::RedisError;

use super::backoff::Backoff;
use super::connection::is_connection_error;
use super::errors::ConnectError;
use super::link_config::LinkConfig;
use super::shared::Shared;
use super::status::{add, Side};

/// One thread's reconnect state.
pub(super) struct ReconnectState {
    side: Side,
    backoff: Backoff,
    /// Reported down; the next connect waits for the backoff first.
    down: bool,
    connected_before: bool,
}

impl ReconnectState {
    pub(super) fn new(side: Side, cfg: &LinkConfig, seed: u64) -> ReconnectState {
        ReconnectState {
            side,
            backoff: Backoff::new(cfg.reconnect_min, cfg.reconnect_max, seed),
            down: false,
            connected_before: false,
        }
    }
}

/// A link thread with one Redis connection. The provided methods are the
/// reconnect logic; implementors give access to their state and the two
/// parts that differ.
pub(super) trait Reconnect {
    fn shared(&self) -> &Shared;

    fn reconnect_state(&mut self) -> &mut ReconnectState;

    /// Opens a connection, sets it up and keeps it (the shared state is
    /// told by the caller, after this returns).
    fn establish(&mut self) -> Result<(), ConnectError>;

    /// Forgets the connection (it broke, or Redis cannot serve now).
    fn drop_connection(&mut self);

    /// Waits for the backoff until `deadline`, returning early when the
    /// link stops.
    fn wait_until(&mut self, deadline: Instant);

    /// Connects (after the backoff delay when down). Answers whether the
    /// thread is connected.
    fn connect(&mut self) -> bool {
        if self.reconnect_state().down {
            let deadline = Instant::now() + self.reconnect_state().backoff.next_delay();
            self.wait_until(deadline);
            if self.shared().stopping() {
                return false;
            }
        }
        match self.try_connect() {
            Ok(()) => true,
            Err(reason) => {
                self.went_down(&reason.to_string());
                false
            }
        }
    }

    /// One attempt, counted in `reconnects` or `connect_failures`; on
    /// success the backoff starts again from its minimum and the link may
    /// be up as a whole.
    fn try_connect(&mut self) -> Result<(), ConnectError> {
        match self.establish() {
            Ok(()) => {
                let state = self.reconnect_state();
                let again = std::mem::replace(&mut state.connected_before, true);
                state.down = false;
                state.backoff.reset();
                let side = state.side;
                if again {
                    add(&self.shared().c.reconnects, 1);
                }
                self.shared().conn_up(side);
                Ok(())
            }
            Err(e) => {
                add(&self.shared().c.connect_failures, 1);
                Err(e)
            }
        }
    }

    /// A command failed: on a broken connection one immediate retry,
    /// otherwise (or if that fails too) the thread is down.
    fn connection_failed(&mut self, e: &RedisError) {
        self.drop_connection();
        if self.shared().stopping() {
            return;
        }
        if is_connection_error(e) {
            match self.try_connect() {
                Ok(()) => return,
                Err(again) => log::debug!(
                    "redis {}: {e}; reconnecting: {again}",
                    self.reconnect_state().side.name()
                ),
            }
        }
        self.went_down(&e.to_string());
    }

    /// The thread is down (reported once per outage by the shared state);
    /// it reconnects after the backoff.
    fn went_down(&mut self, reason: &str) {
        self.drop_connection();
        let state = self.reconnect_state();
        state.down = true;
        let side = state.side;
        self.shared().conn_down(side, reason);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::time::Duration;

    use redis::ErrorKind;

    use super::*;
    use crate::cluster::inbound::Inbound;
    use crate::cluster::shared::tests::shared;
    use crate::cluster::status::LinkState;

    /// A link thread whose connection attempts succeed or fail as the test
    /// says: the reconnect logic under test is the trait's own, the
    /// `Shared` is the real one; only Redis is left out.
    struct Thread {
        sh: Shared,
        state: ReconnectState,
        attempts: VecDeque<bool>,
        connected: bool,
        /// How long each backoff wait was asked to last.
        waits: Vec<Duration>,
    }

    impl Reconnect for Thread {
        fn shared(&self) -> &Shared {
            &self.sh
        }

        fn reconnect_state(&mut self) -> &mut ReconnectState {
            &mut self.state
        }

        fn establish(&mut self) -> Result<(), ConnectError> {
            if self
                .attempts
                .pop_front()
                .expect("an attempt the test planned")
            {
                self.connected = true;
                Ok(())
            } else {
                Err(ConnectError::Redis(RedisError::from((
                    ErrorKind::Io,
                    "connection refused",
                ))))
            }
        }

        fn drop_connection(&mut self) {
            self.connected = false;
        }

        fn wait_until(&mut self, deadline: Instant) {
            self.waits
                .push(deadline.saturating_duration_since(Instant::now()));
        }
    }

    fn thread(side: Side, attempts: &[bool]) -> (Thread, mio::Poll) {
        let mut cfg = LinkConfig::new("redis://127.0.0.1:6379", "test-node");
        cfg.reconnect_min = Duration::from_millis(100);
        cfg.reconnect_max = Duration::from_millis(400);
        let (sh, poll) = shared(cfg.clone());
        let thread = Thread {
            sh,
            state: ReconnectState::new(side, &cfg, 7),
            attempts: attempts.iter().copied().collect(),
            connected: false,
            waits: Vec::new(),
        };
        (thread, poll)
    }

    fn drained(t: &Thread) -> Vec<Inbound> {
        t.sh.inbox.drain().into_iter().collect()
    }

    #[test]
    fn failures_back_off_and_a_success_starts_over() {
        let (mut t, _poll) = thread(Side::Writer, &[false, false, false, true, false, true]);
        // The first attempt does not wait.
        assert!(!t.connect());
        assert!(t.waits.is_empty());
        assert!(t.state.down);
        assert!(!t.connect());
        assert!(!t.connect());
        // One Down for the whole outage.
        let down: Vec<Inbound> = drained(&t);
        assert!(
            matches!(&down[..], [Inbound::Down { reason }] if reason.contains("connection refused")),
            "{down:?}"
        );
        assert!(t.connect());
        assert!(t.connected && !t.state.down);
        let ms: Vec<u128> = t.waits.iter().map(Duration::as_millis).collect();
        // 100, 200, 400 less up to a quarter, never under the minimum.
        assert!((70..=100).contains(&ms[0]), "{ms:?}");
        assert!((145..=200).contains(&ms[1]), "{ms:?}");
        assert!((295..=400).contains(&ms[2]), "{ms:?}");
        let stats = t.sh.stats();
        assert_eq!((stats.connect_failures, stats.reconnects), (3, 0));
        // The writer alone does not make the link up.
        assert_eq!(stats.state, LinkState::Down);
        t.sh.conn_up(Side::Reader);
        assert_eq!(drained(&t), [Inbound::Up]);

        // The next outage waits from the minimum again.
        t.went_down("LOADING");
        assert!(!t.connected);
        assert!(!t.connect());
        assert!(t.connect());
        assert!(t.waits[3] <= Duration::from_millis(100), "{:?}", t.waits);
        let stats = t.sh.stats();
        assert_eq!((stats.connect_failures, stats.reconnects), (4, 1));
    }

    #[test]
    fn a_broken_connection_is_retried_once_at_once() {
        let (mut t, _poll) = thread(Side::Reader, &[true, true]);
        assert!(t.connect());
        let broken = RedisError::from((ErrorKind::Io, "broken pipe"));
        t.connection_failed(&broken);
        // Reconnected without waiting and without an outage.
        assert!(t.connected && !t.state.down);
        assert!(t.waits.is_empty());
        let stats = t.sh.stats();
        assert_eq!((stats.reconnects, stats.outages), (1, 0));
        assert!(t.attempts.is_empty());
    }

    #[test]
    fn a_failed_retry_is_an_outage() {
        let (mut t, _poll) = thread(Side::Reader, &[true, false]);
        assert!(t.connect());
        t.connection_failed(&RedisError::from((ErrorKind::Io, "broken pipe")));
        assert!(!t.connected && t.state.down);
        let down = drained(&t);
        assert!(
            matches!(&down[..], [Inbound::Down { reason }] if reason.contains("broken pipe")),
            "{down:?}"
        );
        assert_eq!(t.sh.stats().outages, 1);
    }

    #[test]
    fn an_error_of_redis_itself_is_not_retried_at_once() {
        // Redis answered (LOADING and the like): the connection works but
        // Redis cannot serve now, so the thread waits for the backoff.
        let (mut t, _poll) = thread(Side::Reader, &[true]);
        assert!(t.connect());
        let loading = redis::make_extension_error("LOADING".into(), Some("loading".into()));
        t.connection_failed(&loading);
        assert!(!t.connected && t.state.down);
        assert!(t.attempts.is_empty(), "no attempt was made");
        assert_eq!(t.sh.stats().outages, 1);
    }

    #[test]
    fn nothing_is_retried_once_stopping() {
        let (mut t, _poll) = thread(Side::Writer, &[true]);
        assert!(t.connect());
        t.sh.stop.store(true, std::sync::atomic::Ordering::Release);
        t.connection_failed(&RedisError::from((ErrorKind::Io, "broken pipe")));
        assert!(!t.connected);
        assert!(!t.state.down);
        assert!(t.attempts.is_empty());
    }
}
