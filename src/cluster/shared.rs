//! [`Shared`]: what the handle and the two threads share (settings,
//! queues, status, counters), with the transitions of the link's state
//! and the answers pushed to the loop. One place for everything that
//! crosses threads.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use redis::Value;

use super::errors::RequestError;
use super::inbound::{Inbound, LostKind};
use super::link_config::LinkConfig;
use super::protocol;
use super::queues::{Command, Inbox, Outbox};
use super::status::{add, millis, Counters, LinkState, LinkStats, Side, Status};
use super::streams::History;

pub(super) struct Shared {
    pub(super) cfg: LinkConfig,
    /// `host:port` (no credentials), for logs.
    pub(super) addr: String,
    /// Random per process: publishes of a restarted node never collide with
    /// the dedup state of its previous run.
    pub(super) instance: String,
    pub(super) stop: AtomicBool,
    /// The reader has taken its start position on the bus: until then the
    /// writer holds publishes back, so that the node's own reader sees
    /// every message published after `start`.
    pub(super) reader_ready: AtomicBool,
    pub(super) outbox: Outbox,
    pub(super) inbox: Inbox,
    pub(super) status: Mutex<Status>,
    pub(super) c: Counters,
    /// Queue-full losses not yet reported as `Inbound::Lost`.
    pub(super) overflow: AtomicU64,
    pub(super) next_seq: AtomicU64,
    pub(super) next_request: AtomicU64,
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    pub(super) fn new(cfg: LinkConfig, addr: String, waker: Arc<mio::Waker>) -> Shared {
        Shared {
            addr,
            instance: format!("{:016x}", protocol::random_u64()),
            stop: AtomicBool::new(false),
            reader_ready: AtomicBool::new(false),
            outbox: Outbox::new(cfg.outbound_queue),
            inbox: Inbox::new(cfg.inbound_queue, waker),
            status: Mutex::new(Status {
                writer_up: false,
                reader_up: false,
                state: LinkState::Connecting,
                epoch: None,
                epoch_gen: 0,
                outages: 0,
                resets: 0,
                down_since: None,
                down_total: Duration::ZERO,
            }),
            c: Counters::default(),
            overflow: AtomicU64::new(0),
            next_seq: AtomicU64::new(0),
            next_request: AtomicU64::new(0),
            cfg,
        }
    }

    pub(super) fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    pub(super) fn conn_up(&self, side: Side) {
        let mut s = lock(&self.status);
        match side {
            Side::Writer => s.writer_up = true,
            Side::Reader => s.reader_up = true,
        }
        if s.writer_up && s.reader_up && s.state != LinkState::Up && !self.stopping() {
            match s.down_since.take() {
                Some(since) => {
                    let outage = since.elapsed();
                    s.down_total += outage;
                    log::info!(
                        "redis link to {} is up again after {:.1} s",
                        self.addr,
                        outage.as_secs_f64()
                    );
                }
                None => log::info!(
                    "redis link to {} is up (node {})",
                    self.addr,
                    self.cfg.node_id
                ),
            }
            s.state = LinkState::Up;
            self.inbox.push_control(Inbound::Up);
        }
    }

    pub(super) fn conn_down(&self, side: Side, reason: &str) {
        let mut s = lock(&self.status);
        match side {
            Side::Writer => s.writer_up = false,
            Side::Reader => s.reader_up = false,
        }
        if matches!(s.state, LinkState::Up | LinkState::Connecting) && !self.stopping() {
            s.state = LinkState::Down;
            s.outages += 1;
            s.down_since = Some(Instant::now());
            log::warn!(
                "redis link to {} is down ({reason}); local clients are still served, \
                 publishes are queued (up to {}), reconnecting with backoff",
                self.addr,
                self.cfg.outbound_queue
            );
            self.inbox.push_control(Inbound::Down {
                reason: reason.to_string(),
            });
        }
    }

    /// Records the epoch now in Redis; a change means Redis lost its data.
    /// Answers the epoch generation.
    pub(super) fn note_epoch(&self, epoch: String) -> u64 {
        let mut s = lock(&self.status);
        match &s.epoch {
            Some(old) if *old == epoch => {}
            Some(_) => {
                s.epoch = Some(epoch);
                s.epoch_gen += 1;
                s.resets += 1;
                log::warn!(
                    "redis at {} lost its data (restart without persistence or flush): \
                     channel offsets start again from 1, earlier history is gone",
                    self.addr
                );
                self.inbox.push_control(Inbound::Reset);
            }
            None => s.epoch = Some(epoch),
        }
        s.epoch_gen
    }

    pub(super) fn lost(&self, count: u64, kind: LostKind) {
        if count > 0 {
            self.inbox.push_control(Inbound::Lost { count, kind });
        }
    }

    pub(super) fn report_overflow(&self) {
        let n = self.overflow.swap(0, Ordering::AcqRel);
        self.lost(n, LostKind::QueueFull);
    }

    /// Answers a read (history, a script call) with an error.
    pub(super) fn fail_read(&self, cmd: Command, why: RequestError) {
        match cmd {
            Command::Script { request, .. } => self.answer_script(request, Err(why)),
            history => self.answer_history(history, Err(why)),
        }
    }

    pub(super) fn answer_script(&self, request: u64, result: Result<Value, RequestError>) {
        self.inbox.push_control(Inbound::Script { request, result });
    }

    pub(super) fn answer_history(&self, cmd: Command, result: Result<History, RequestError>) {
        if let Command::History {
            request, channel, ..
        } = cmd
        {
            add(&self.c.history_answered, 1);
            self.inbox.push_control(Inbound::History {
                request,
                channel,
                result,
            });
        }
    }

    pub(super) fn stats(&self) -> LinkStats {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let s = lock(&self.status);
        let down = s.down_since.map(|t| t.elapsed()).unwrap_or_default();
        LinkStats {
            state: s.state,
            published: load(&self.c.published),
            defined: load(&self.c.defined),
            received: self.inbox.messages_in(),
            lost_queue_full: load(&self.c.lost_queue_full),
            lost_rejected: load(&self.c.lost_rejected),
            lost_bus_gap: load(&self.c.lost_bus_gap),
            lost_at_shutdown: load(&self.c.lost_at_shutdown),
            malformed: load(&self.c.malformed),
            duplicates: load(&self.c.duplicates),
            history_answered: load(&self.c.history_answered),
            writes_lost: load(&self.c.writes_lost),
            outbound_queued: self.outbox.len(),
            inbound_queued: self.inbox.len(),
            lag_ms: load(&self.c.lag_ms),
            reconnects: load(&self.c.reconnects),
            connect_failures: load(&self.c.connect_failures),
            outages: s.outages,
            resets: s.resets,
            down_ms: millis(down),
            down_total_ms: millis(s.down_total + down),
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A `Shared` as `RedisLink::start` makes it, with a real waker (no
    /// Redis needed: nothing here does I/O). Keep the `Poll` alive.
    pub(in crate::cluster) fn shared(cfg: LinkConfig) -> (Shared, mio::Poll) {
        let poll = mio::Poll::new().unwrap();
        let waker = Arc::new(mio::Waker::new(poll.registry(), mio::Token(0)).unwrap());
        (Shared::new(cfg, "127.0.0.1:6379".into(), waker), poll)
    }

    fn config() -> LinkConfig {
        LinkConfig::new("redis://127.0.0.1:6379", "test-node")
    }

    fn drained(sh: &Shared) -> Vec<Inbound> {
        sh.inbox.drain().into_iter().collect()
    }

    fn state(sh: &Shared) -> LinkState {
        lock(&sh.status).state
    }

    #[test]
    fn the_link_is_up_when_both_connections_are() {
        let (sh, _poll) = shared(config());
        assert_eq!(state(&sh), LinkState::Connecting);
        sh.conn_up(Side::Writer);
        assert_eq!(state(&sh), LinkState::Connecting);
        assert_eq!(drained(&sh), []);
        sh.conn_up(Side::Reader);
        assert_eq!(state(&sh), LinkState::Up);
        assert_eq!(drained(&sh), [Inbound::Up]);
        // Up again while up: nothing new.
        sh.conn_up(Side::Reader);
        assert_eq!(drained(&sh), []);
        assert_eq!(sh.stats().outages, 0);
    }

    #[test]
    fn an_outage_is_reported_once_and_timed() {
        let (sh, _poll) = shared(config());
        sh.conn_up(Side::Writer);
        sh.conn_up(Side::Reader);
        drained(&sh);
        sh.conn_down(Side::Reader, "connection refused");
        assert_eq!(state(&sh), LinkState::Down);
        // The other connection failing too is the same outage.
        sh.conn_down(Side::Writer, "broken pipe");
        sh.conn_down(Side::Reader, "connection refused");
        assert_eq!(
            drained(&sh),
            [Inbound::Down {
                reason: "connection refused".into()
            }]
        );
        std::thread::sleep(Duration::from_millis(20));
        let during = sh.stats();
        assert_eq!((during.state, during.outages), (LinkState::Down, 1));
        assert!(during.down_ms >= 20, "{during:?}");
        // Both must come back.
        sh.conn_up(Side::Writer);
        assert_eq!(state(&sh), LinkState::Down);
        sh.conn_up(Side::Reader);
        assert_eq!(drained(&sh), [Inbound::Up]);
        let after = sh.stats();
        assert_eq!(
            (after.state, after.outages, after.down_ms),
            (LinkState::Up, 1, 0)
        );
        assert!(after.down_total_ms >= 20, "{after:?}");
    }

    #[test]
    fn a_failed_first_connection_is_an_outage() {
        let (sh, _poll) = shared(config());
        sh.conn_down(Side::Writer, "connection refused");
        assert_eq!(state(&sh), LinkState::Down);
        assert_eq!(sh.stats().outages, 1);
        assert!(matches!(drained(&sh)[..], [Inbound::Down { .. }]));
    }

    #[test]
    fn nothing_changes_once_stopping() {
        let (sh, _poll) = shared(config());
        sh.conn_up(Side::Writer);
        sh.conn_up(Side::Reader);
        drained(&sh);
        sh.stop.store(true, Ordering::Release);
        sh.conn_down(Side::Writer, "shutting down");
        assert_eq!(state(&sh), LinkState::Up);
        assert_eq!(drained(&sh), []);
    }

    #[test]
    fn an_epoch_change_is_a_reset() {
        let (sh, _poll) = shared(config());
        assert_eq!(sh.note_epoch("aaaa".into()), 0);
        assert_eq!(sh.note_epoch("aaaa".into()), 0);
        assert_eq!(drained(&sh), []);
        assert_eq!(sh.note_epoch("bbbb".into()), 1);
        assert_eq!(drained(&sh), [Inbound::Reset]);
        assert_eq!(sh.note_epoch("bbbb".into()), 1);
        assert_eq!(sh.note_epoch("cccc".into()), 2);
        assert_eq!(sh.stats().resets, 2);
    }

    #[test]
    fn queue_full_losses_are_reported_in_one_sum() {
        let (sh, _poll) = shared(config());
        sh.report_overflow();
        assert_eq!(drained(&sh), []);
        add(&sh.overflow, 3);
        sh.report_overflow();
        sh.report_overflow();
        assert_eq!(
            drained(&sh),
            [Inbound::Lost {
                count: 3,
                kind: LostKind::QueueFull
            }]
        );
    }

    #[test]
    fn failed_reads_are_answered_with_the_reason() {
        let (sh, _poll) = shared(config());
        let call = |script| crate::cluster::ScriptCall {
            script: crate::cluster::LuaScript::new(script),
            keys: vec!["k".into()],
            args: Vec::new(),
        };
        for (request, script) in [(1, "return 1"), (2, "return 2")] {
            let call = call(script);
            let mode = crate::cluster::ScriptMode::Read;
            sh.fail_read(
                Command::Script {
                    request,
                    call,
                    mode,
                },
                RequestError::Down,
            );
        }
        sh.fail_read(
            Command::History {
                request: 3,
                channel: "prices".into(),
                after_offset: 7,
                limit: 10,
                newest: false,
            },
            RequestError::Connection("broken pipe".into()),
        );
        let answers = drained(&sh);
        assert_eq!(
            answers,
            [
                Inbound::Script {
                    request: 1,
                    result: Err(RequestError::Down)
                },
                Inbound::Script {
                    request: 2,
                    result: Err(RequestError::Down)
                },
                Inbound::History {
                    request: 3,
                    channel: "prices".into(),
                    result: Err(RequestError::Connection("broken pipe".into()))
                },
            ]
        );
        assert_eq!(sh.stats().history_answered, 1);
    }
}
