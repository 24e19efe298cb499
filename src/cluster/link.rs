//! [`RedisLink`]: the non-blocking handle the event loop holds. It
//! starts the writer and reader threads, queues requests for them and
//! hands over what they produce. See the module doc of [`crate::cluster`]
//! for the design.

use std::fmt;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use redis::Client;

use super::errors::Full;
use super::inbound::Inbound;
use super::link_config::{LinkConfig, LinkConfigError};
use super::protocol;
use super::queues::Command;
use super::reader::Reader;
use super::requests::{ScriptCall, ScriptMode, WriteCommand};
use super::shared::{lock, Shared};
use super::status::{add, LinkState, LinkStats};
use super::writer::Writer;

/// The most entries one history request answers.
pub const MAX_HISTORY: usize = 10_000;

/// The non-blocking handle the event loop holds. Dropping it shuts the link
/// down like [`RedisLink::shutdown`].
pub struct RedisLink {
    sh: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl RedisLink {
    /// Validates `config`, starts the writer and reader threads and returns
    /// at once; connecting happens in the background (watch for
    /// [`Inbound::Up`] / [`Inbound::Down`]). `waker` is woken whenever
    /// inbound items become available.
    pub fn start(config: LinkConfig, waker: Arc<mio::Waker>) -> io::Result<RedisLink> {
        let invalid = |e: LinkConfigError| io::Error::new(io::ErrorKind::InvalidInput, e);
        config.check().map_err(invalid)?;
        let client = Client::open(config.url.as_str()).map_err(|source| {
            invalid(LinkConfigError::Url {
                url: config.url.clone(),
                source,
            })
        })?;
        let addr = client.get_connection_info().addr().to_string();
        let sh = Arc::new(Shared::new(config, addr, waker));
        let seed = protocol::random_u64();
        let writer = Writer::new(sh.clone(), client.clone(), seed);
        let reader = Reader::new(sh.clone(), client, seed.rotate_left(17));
        let mut threads = Vec::with_capacity(2);
        let spawned = std::thread::Builder::new()
            .name("fanout-redis-writer".into())
            .spawn(move || writer.run())
            .and_then(|w| {
                threads.push(w);
                std::thread::Builder::new()
                    .name("fanout-redis-reader".into())
                    .spawn(move || reader.run())
            });
        let mut link = RedisLink { sh, threads };
        match spawned {
            Ok(r) => {
                link.threads.push(r);
                Ok(link)
            }
            Err(e) => {
                link.stop();
                Err(e)
            }
        }
    }

    /// This node's id (the `origin` of its messages).
    pub fn node_id(&self) -> &str {
        &self.sh.cfg.node_id
    }

    /// Queues `payload` for `channel`; never blocks. Answers the publish's
    /// `origin_seq` (1, 2, ... per link), which comes back in the
    /// [`Inbound::Message`] that carries its offset. On [`Full`] the
    /// message is dropped, counted (`lost_queue_full`) and later reported
    /// as `Inbound::Lost { kind: QueueFull }`.
    pub fn publish(&self, channel: &str, payload: String) -> Result<u64, Full> {
        let seq = self.sh.next_seq.fetch_add(1, Ordering::Relaxed) + 1;
        let cmd = Command::Publish {
            id: seq,
            channel: channel.to_string(),
            payload,
        };
        match self.sh.outbox.push(cmd) {
            Ok(()) => Ok(seq),
            Err(_) => {
                add(&self.sh.c.lost_queue_full, 1);
                add(&self.sh.overflow, 1);
                Err(Full)
            }
        }
    }

    /// Queues a definition of `channel` (the app's encoding of its
    /// settings); never blocks. Redis records it unless the channel has one
    /// already, and announces the one in force on the bus: it comes back as
    /// [`Inbound::Definition`] with the `origin_seq` answered here (from
    /// the same sequence as `publish`, in order with publishes). On [`Full`]
    /// nothing is queued (and nothing counted: the caller refuses the
    /// request).
    pub fn define(&self, channel: &str, definition: String) -> Result<u64, Full> {
        let seq = self.sh.next_seq.fetch_add(1, Ordering::Relaxed) + 1;
        let cmd = Command::Define {
            id: seq,
            channel: channel.to_string(),
            definition,
        };
        self.sh.outbox.push(cmd).map(|()| seq).map_err(|_| Full)
    }

    /// This node run's id in Redis, `{node}:{instance}` (a fresh instance
    /// per link): its alive key is [`protocol::ALIVE_PREFIX`] followed by
    /// it. The link sets that key when it connects, refreshes it every
    /// second with the TTL [`LinkConfig::alive_ttl`], and deletes it at
    /// shutdown, so what the app keeps in Redis under this id can be told
    /// void once its run is gone.
    pub fn alive_id(&self) -> String {
        format!("{}:{}", self.sh.cfg.node_id, self.sh.instance)
    }

    /// Queues a call of a Lua script; never blocks. Answers a request id;
    /// Redis's reply comes back as [`Inbound::Script`], after this link's
    /// earlier commands. `mode` says what happens while Redis is
    /// unreachable and what a full queue counts (see [`ScriptMode`]).
    pub fn script(&self, call: ScriptCall, mode: ScriptMode) -> Result<u64, Full> {
        let request = self.sh.next_request.fetch_add(1, Ordering::Relaxed) + 1;
        let cmd = Command::Script {
            request,
            call,
            mode,
        };
        self.sh.outbox.push(cmd).map(|()| request).map_err(|_| {
            if mode == ScriptMode::Durable {
                add(&self.sh.c.writes_lost, 1);
            }
            Full
        })
    }

    /// Queues idempotent write commands, sent in order, pipelined with
    /// neighbouring writes; never blocks, nothing is answered. While Redis
    /// is unreachable they wait, and a run the connection broke under is
    /// sent again. On [`Full`] they count once in
    /// [`LinkStats::writes_lost`](super::LinkStats::writes_lost), as does
    /// each command Redis refuses (logged, rate-limited, as `what`, e.g.
    /// "cache update(s)").
    pub fn write(&self, what: &'static str, commands: Vec<WriteCommand>) -> Result<(), Full> {
        let cmd = Command::Writes { what, commands };
        self.sh.outbox.push(cmd).map_err(|_| {
            add(&self.sh.c.writes_lost, 1);
            Full
        })
    }

    /// Asks for the messages of `channel` after `after_offset` (at most
    /// `limit`, clamped to 1..=[`MAX_HISTORY`]); never blocks. Answers a
    /// request id; the result comes back as [`Inbound::History`], in order
    /// with this link's earlier publishes. While Redis is unreachable the
    /// answer is an error, at once.
    pub fn history(&self, channel: &str, after_offset: u64, limit: usize) -> Result<u64, Full> {
        let request = self.sh.next_request.fetch_add(1, Ordering::Relaxed) + 1;
        let cmd = Command::History {
            request,
            channel: channel.to_string(),
            after_offset,
            limit: limit.clamp(1, MAX_HISTORY),
            newest: false,
        };
        self.sh.outbox.push(cmd).map(|()| request).map_err(|_| Full)
    }

    /// Asks for the latest `limit` messages of `channel` (clamped to
    /// 1..=[`MAX_HISTORY`]), like [`RedisLink::history`] otherwise: the
    /// answer is an [`Inbound::History`] with the entries oldest first and
    /// `missed` and `more` both 0.
    pub fn recent(&self, channel: &str, limit: usize) -> Result<u64, Full> {
        let request = self.sh.next_request.fetch_add(1, Ordering::Relaxed) + 1;
        let cmd = Command::History {
            request,
            channel: channel.to_string(),
            after_offset: 0,
            limit: limit.clamp(1, MAX_HISTORY),
            newest: true,
        };
        self.sh.outbox.push(cmd).map(|()| request).map_err(|_| Full)
    }

    /// Everything that arrived since the last call, oldest first; never
    /// blocks. Call it after each wake of the link's `mio::Waker` token.
    pub fn drain(&self) -> impl Iterator<Item = Inbound> {
        self.sh.inbox.drain().into_iter()
    }

    pub fn state(&self) -> LinkState {
        lock(&self.sh.status).state
    }

    pub fn stats(&self) -> LinkStats {
        self.sh.stats()
    }

    /// Stops the threads (the writer first flushes queued publishes if it
    /// is connected), waiting at most `shutdown_timeout`; a thread that
    /// does not finish in time is left to end on its own. Answers the final
    /// stats.
    pub fn shutdown(mut self) -> LinkStats {
        self.stop();
        self.sh.stats()
    }

    fn stop(&mut self) {
        if self.threads.is_empty() {
            return;
        }
        self.sh.stop.store(true, Ordering::Release);
        self.sh.outbox.wake();
        self.sh.inbox.release();
        let deadline = Instant::now() + self.sh.cfg.shutdown_timeout;
        for t in self.threads.drain(..) {
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
            if t.is_finished() {
                if t.join().is_err() {
                    log::error!("redis link thread panicked");
                }
            } else {
                log::warn!(
                    "redis link thread {:?} did not stop within {:?}; leaving it",
                    t.thread().name().unwrap_or("?"),
                    self.sh.cfg.shutdown_timeout
                );
            }
        }
        let mut s = lock(&self.sh.status);
        if let Some(since) = s.down_since.take() {
            s.down_total += since.elapsed();
        }
        s.state = LinkState::Stopped;
    }
}

impl Drop for RedisLink {
    fn drop(&mut self) {
        self.stop();
    }
}

impl fmt::Debug for RedisLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisLink")
            .field("addr", &self.sh.addr)
            .field("node_id", &self.sh.cfg.node_id)
            .field("state", &self.state())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::inbound::LostKind;
    use crate::cluster::{LuaScript, RequestError};

    fn call() -> ScriptCall {
        ScriptCall {
            script: LuaScript::new("return redis.call('GET', KEYS[1])"),
            keys: vec!["k".into()],
            args: Vec::new(),
        }
    }

    /// A link to a port where nothing listens (connections are refused at
    /// once): what it does without Redis.
    fn unreachable(outbound_queue: usize) -> (RedisLink, mio::Poll) {
        let poll = mio::Poll::new().unwrap();
        let waker = Arc::new(mio::Waker::new(poll.registry(), mio::Token(0)).unwrap());
        let mut cfg = LinkConfig::new("redis://127.0.0.1:1", "test-node");
        cfg.outbound_queue = outbound_queue;
        cfg.reconnect_min = Duration::from_millis(20);
        cfg.reconnect_max = Duration::from_millis(50);
        cfg.io_timeout = Duration::from_millis(200);
        cfg.shutdown_timeout = Duration::from_secs(2);
        (RedisLink::start(cfg, waker).unwrap(), poll)
    }

    /// Everything drained until an item matches `want` (panics after 5 s).
    fn drain_until(link: &RedisLink, want: impl Fn(&Inbound) -> bool) -> Vec<Inbound> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut seen = Vec::new();
        while !seen.iter().any(&want) {
            assert!(Instant::now() < deadline, "not seen in time: {seen:?}");
            std::thread::sleep(Duration::from_millis(5));
            seen.extend(link.drain());
        }
        seen
    }

    #[test]
    fn a_bad_config_is_refused_before_any_thread_starts() {
        let poll = mio::Poll::new().unwrap();
        let waker = Arc::new(mio::Waker::new(poll.registry(), mio::Token(0)).unwrap());
        let mut cfg = LinkConfig::new("redis://127.0.0.1:1", "test-node");
        cfg.batch = 0;
        let e = RedisLink::start(cfg, waker.clone()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert_eq!(e.to_string(), "batch must be at least 1");
        let inner = e
            .get_ref()
            .and_then(|e| e.downcast_ref::<LinkConfigError>());
        assert!(
            matches!(inner, Some(LinkConfigError::Zero("batch"))),
            "{e:?}"
        );
        let cfg = LinkConfig::new("http://127.0.0.1:1", "test-node");
        let e = RedisLink::start(cfg, waker).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(
            e.to_string()
                .starts_with("redis url \"http://127.0.0.1:1\": "),
            "{e}"
        );
    }

    #[test]
    fn the_outbound_queue_is_bounded_and_losses_are_counted() {
        let (link, _poll) = unreachable(3);
        assert_eq!(link.publish("prices", "1".into()), Ok(1));
        assert_eq!(link.publish("prices", "2".into()), Ok(2));
        assert_eq!(link.define("prices", "{}".into()), Ok(3));
        assert_eq!(link.publish("prices", "3".into()), Err(Full));
        // A refused definition is the caller's to report: not counted.
        assert_eq!(link.define("news", "{}".into()), Err(Full));
        let write = || vec![vec!["SET".to_string(), "k".into(), "v".into()]];
        assert_eq!(link.write("test write(s)", write()), Err(Full));
        assert_eq!(link.write("test write(s)", write()), Err(Full));
        assert_eq!(link.script(call(), ScriptMode::Durable), Err(Full));
        // A read that does not fit is the caller's to answer: not counted.
        assert_eq!(link.script(call(), ScriptMode::Read), Err(Full));
        assert_eq!(link.history("prices", 0, 10), Err(Full));
        let stats = link.stats();
        assert_eq!(stats.outbound_queued, 3);
        assert_eq!(stats.lost_queue_full, 1);
        assert_eq!(stats.writes_lost, 3);
        // The writer reports the queue-full loss while it waits for Redis.
        let lost = Inbound::Lost {
            count: 1,
            kind: LostKind::QueueFull,
        };
        drain_until(&link, |i| *i == lost);
        // Publishes and definitions never sent are counted at shutdown.
        let stats = link.shutdown();
        assert_eq!(stats.state, LinkState::Stopped);
        assert_eq!(stats.lost_at_shutdown, 3);
    }

    #[test]
    fn reads_are_answered_at_once_while_down() {
        let (link, _poll) = unreachable(100);
        let seen = drain_until(&link, |i| matches!(i, Inbound::Down { .. }));
        assert!(
            matches!(&seen[..], [Inbound::Down { reason }] if !reason.is_empty()),
            "{seen:?}"
        );
        assert_eq!(link.state(), LinkState::Down);
        let first = link.script(call(), ScriptMode::Read).unwrap();
        let history = link.history("prices", 5, 10).unwrap();
        // A durable call waits for Redis instead.
        let durable = link.script(call(), ScriptMode::Durable).unwrap();
        let last = link.script(call(), ScriptMode::Read).unwrap();
        let answers = drain_until(
            &link,
            |i| matches!(i, Inbound::Script { request, .. } if *request == last),
        );
        // All three reads, in the order asked.
        assert_eq!(
            answers,
            [
                Inbound::Script {
                    request: first,
                    result: Err(RequestError::Down)
                },
                Inbound::History {
                    request: history,
                    channel: "prices".into(),
                    result: Err(RequestError::Down)
                },
                Inbound::Script {
                    request: last,
                    result: Err(RequestError::Down)
                },
            ]
        );
        assert!(durable < last);
        let stats = link.stats();
        assert_eq!(stats.history_answered, 1);
        assert!(stats.connect_failures >= 2, "{stats:?}");
        assert_eq!(stats.outages, 1);
        // The durable call is still queued.
        assert_eq!(stats.outbound_queued, 1);
    }
}
