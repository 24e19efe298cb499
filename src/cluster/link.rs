//! [`RedisLink`]: the two Redis threads (writer, reader) and the
//! non-blocking handle the event loop holds. See the module doc of
//! [`crate::cluster`] for the design.

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redis::{Client, Connection, ErrorKind, RedisError, Script, Value};

use super::backoff::Backoff;
use super::protocol::{
    self, alive_key, channel_key, dedup_key, nick_key, offset_key, presence_field, room_key,
    BusItem, History, PublishReply, ReplyError, StreamId, ALIVE_PREFIX, BUS_KEY, BUS_SEQ_KEY,
    DEDUP_TTL_SECS, DEFINE_LUA, DEFINITIONS_KEY, EPOCH_KEY, NICK_CLAIM_LUA, NICK_RELEASE_LUA,
    PUBLISH_LUA, ROOMS_KEY, ROOMS_LUA, WHO_LUA,
};
use super::queues::{Command, Inbox, Outbox};

/// The most entries one history request answers.
pub const MAX_HISTORY: usize = 10_000;

/// How often the writer refreshes its node run's alive key (which also
/// checks its connection when idle).
const HEALTH_INTERVAL: Duration = Duration::from_secs(1);
/// The longest a link thread sleeps before looking at the stop flag.
const TICK: Duration = Duration::from_millis(100);
/// Repeated warnings (malformed entries, rejected publishes) are logged at
/// most this often.
const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// Settings of a [`RedisLink`]. [`LinkConfig::new`] fills in defaults.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// `redis://[:PASSWORD@]HOST:PORT[/DB]` (`rediss://` is refused: no TLS
    /// built in).
    pub url: String,
    /// This node's name: the `origin` of its messages. 1 to 64 ASCII
    /// letters, digits, `_`, `-`, `.`; unique per node.
    pub node_id: String,
    /// Per-channel stream bound (`MAXLEN ~`): how far back "resume since N"
    /// reaches.
    pub stream_maxlen: usize,
    /// Bus stream bound (`MAXLEN ~`): how far a reader may fall behind (or
    /// be disconnected) before it misses messages, which it then reports as
    /// [`LostKind::BusGap`].
    pub bus_maxlen: usize,
    /// First reconnect delay; it doubles up to `reconnect_max`.
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// Publishes and history requests waiting for Redis, including the
    /// batch in flight. Beyond it `publish` answers [`Full`].
    pub outbound_queue: usize,
    /// Bus messages waiting for the event loop to `drain`. When full, the
    /// reader pauses (Redis holds the backlog in the bus).
    pub inbound_queue: usize,
    /// Most publishes per pipelined round trip, and most bus entries per
    /// `XREAD` (`COUNT`).
    pub batch: usize,
    /// `XREAD BLOCK` time: also how long the reader takes to notice
    /// shutdown.
    pub read_block: Duration,
    /// Connect timeout and per-command timeout.
    pub io_timeout: Duration,
    /// How long `shutdown` waits for the threads (the writer spends up to
    /// half of it flushing queued publishes).
    pub shutdown_timeout: Duration,
    /// Chat presence: how long this node's room members stay listed by
    /// `who` on other nodes after this node stopped refreshing its alive
    /// key (it died). Whole seconds, at least 1.
    pub presence_ttl: Duration,
}

impl LinkConfig {
    pub fn new(url: impl Into<String>, node_id: impl Into<String>) -> LinkConfig {
        LinkConfig {
            url: url.into(),
            node_id: node_id.into(),
            stream_maxlen: 10_000,
            bus_maxlen: 100_000,
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            outbound_queue: 10_000,
            inbound_queue: 10_000,
            batch: 256,
            read_block: Duration::from_millis(500),
            io_timeout: Duration::from_secs(2),
            shutdown_timeout: Duration::from_secs(3),
            presence_ttl: Duration::from_secs(15),
        }
    }

    fn check(&self) -> Result<(), LinkConfigError> {
        if !protocol::valid_node_id(&self.node_id) {
            return Err(LinkConfigError::NodeId(self.node_id.clone()));
        }
        for (name, v) in [
            ("stream_maxlen", self.stream_maxlen),
            ("bus_maxlen", self.bus_maxlen),
            ("outbound_queue", self.outbound_queue),
            ("inbound_queue", self.inbound_queue),
            ("batch", self.batch),
        ] {
            if v == 0 {
                return Err(LinkConfigError::Zero(name));
            }
        }
        let hour = Duration::from_secs(3600);
        for (name, v) in [
            ("read_block", self.read_block),
            ("io_timeout", self.io_timeout),
            ("reconnect_min", self.reconnect_min),
            ("reconnect_max", self.reconnect_max),
            ("shutdown_timeout", self.shutdown_timeout),
            ("presence_ttl", self.presence_ttl),
        ] {
            if v > hour {
                return Err(LinkConfigError::OverAnHour(name));
            }
        }
        if self.read_block < Duration::from_millis(1) || self.io_timeout < Duration::from_millis(1)
        {
            return Err(LinkConfigError::TimeoutBelowOneMs);
        }
        if self.presence_ttl < Duration::from_secs(1) {
            return Err(LinkConfigError::PresenceTtlBelowOneSecond);
        }
        Ok(())
    }
}

/// A [`LinkConfig`] that [`RedisLink::start`] refuses (as an
/// [`io::ErrorKind::InvalidInput`] error carrying this one).
#[derive(Debug)]
pub enum LinkConfigError {
    /// `node_id` is not 1 to 64 of the allowed characters.
    NodeId(String),
    /// This count setting is 0.
    Zero(&'static str),
    /// This duration setting is over an hour.
    OverAnHour(&'static str),
    /// `read_block` or `io_timeout` is under a millisecond.
    TimeoutBelowOneMs,
    /// `presence_ttl` is under a second.
    PresenceTtlBelowOneSecond,
    /// The `redis` crate refused the URL.
    Url { url: String, source: RedisError },
}

impl fmt::Display for LinkConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinkConfigError::NodeId(id) => write!(
                f,
                "node id {id:?}: expected 1 to 64 ASCII letters, digits, '_', '-', '.'"
            ),
            LinkConfigError::Zero(name) => write!(f, "{name} must be at least 1"),
            LinkConfigError::OverAnHour(name) => write!(f, "{name} must be at most an hour"),
            LinkConfigError::TimeoutBelowOneMs => {
                f.write_str("read_block and io_timeout must be at least 1 ms")
            }
            LinkConfigError::PresenceTtlBelowOneSecond => {
                f.write_str("presence_ttl must be at least 1 s")
            }
            LinkConfigError::Url { url, source } => write!(f, "redis url {url:?}: {source}"),
        }
    }
}

impl std::error::Error for LinkConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            LinkConfigError::Url { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Why a read ([`RedisLink::history`], [`RedisLink::recent`],
/// [`RedisLink::who`], [`RedisLink::rooms`]) or a nick claim got no
/// answer from Redis. Its text is what clients are told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestError {
    /// Redis was unreachable: reads are answered at once during an outage.
    Down,
    /// The connection broke during the request (the `redis` crate's
    /// message).
    Connection(String),
    /// Redis answered with an error (out of memory, a key of the wrong
    /// type, ...).
    Redis(String),
    /// Redis answered something that is not the expected reply.
    Reply(ReplyError),
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RequestError::Down => f.write_str("redis link is down"),
            RequestError::Connection(why) => write!(f, "redis link: {why}"),
            RequestError::Redis(why) => f.write_str(why),
            RequestError::Reply(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for RequestError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            RequestError::Reply(e) => Some(e),
            _ => None,
        }
    }
}

impl From<ReplyError> for RequestError {
    fn from(e: ReplyError) -> Self {
        RequestError::Reply(e)
    }
}

impl RequestError {
    /// A failed command: a broken connection or Redis's refusal.
    fn of(e: &RedisError) -> RequestError {
        if is_connection_error(e) {
            RequestError::Connection(e.to_string())
        } else {
            RequestError::Redis(e.to_string())
        }
    }
}

/// Why a link thread could not (re)connect; its text is the reason logged
/// and sent in [`Inbound::Down`].
#[derive(Debug)]
enum ConnectError {
    /// Connecting or a command of the set-up failed.
    Redis(RedisError),
    /// Loading a script failed.
    ScriptLoad(RedisError),
    /// Setting this run's alive key failed.
    SetAlive(RedisError),
    /// A set-up reply was not what was expected.
    Reply(ReplyError),
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectError::Redis(e) => e.fmt(f),
            ConnectError::ScriptLoad(e) => write!(f, "SCRIPT LOAD: {e}"),
            ConnectError::SetAlive(e) => write!(f, "SET alive: {e}"),
            ConnectError::Reply(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for ConnectError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ConnectError::Redis(e) | ConnectError::ScriptLoad(e) | ConnectError::SetAlive(e) => {
                Some(e)
            }
            ConnectError::Reply(e) => Some(e),
        }
    }
}

impl From<RedisError> for ConnectError {
    fn from(e: RedisError) -> Self {
        ConnectError::Redis(e)
    }
}

impl From<ReplyError> for ConnectError {
    fn from(e: ReplyError) -> Self {
        ConnectError::Reply(e)
    }
}

/// What the link hands to the event loop (see [`RedisLink::drain`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    /// A message from the bus, from any node including this one (skip your
    /// own by `origin` if you delivered them locally already). Per channel,
    /// offsets increase by one and are the same on every node.
    Message {
        channel: String,
        offset: u64,
        /// The publishing node's `node_id`.
        origin: String,
        /// What `publish` returned on the origin node.
        origin_seq: u64,
        payload: String,
    },
    /// A channel definition announced on the bus (by [`RedisLink::define`]
    /// on any node, this one included): `definition` is the one in force,
    /// the first Redis recorded for the channel, the same in every
    /// announcement of the channel (until Redis loses its data).
    Definition {
        channel: String,
        definition: String,
        /// This announcement's own definition is the one recorded.
        created: bool,
        origin: String,
        /// What `define` returned on the origin node.
        origin_seq: u64,
    },
    /// Every channel definition in Redis when the reader took its place on
    /// the bus (each connection of the reader: start, reconnect, after a
    /// data reset); later ones come as [`Inbound::Definition`]. Sent before
    /// the [`Inbound::Up`] it precedes.
    Definitions { definitions: Vec<(String, String)> },
    /// The answer to [`RedisLink::history`].
    History {
        request: u64,
        channel: String,
        result: Result<History, RequestError>,
    },
    /// The answer to [`RedisLink::who`]: the nicks of the room's members
    /// on every live node, sorted.
    Who {
        request: u64,
        room: String,
        result: Result<Vec<String>, RequestError>,
    },
    /// The answer to [`RedisLink::rooms`]: every room with members on a
    /// live node and how many, sorted by room.
    Rooms {
        request: u64,
        result: Result<Vec<(String, u64)>, RequestError>,
    },
    /// The answer to [`RedisLink::claim_nick`]: whether the nick is this
    /// member's now (false: a member of a live node holds it). Never an
    /// error for an outage: the claim waits for Redis.
    Nick {
        request: u64,
        nick: String,
        result: Result<bool, RequestError>,
    },
    /// Both connections are up (first connect, or after a `Down`).
    Up,
    /// Redis is unreachable: sent once per outage (one warning is logged).
    Down { reason: String },
    /// Redis lost its data (restarted without persistence, flushed, or a
    /// different server): channel offsets start again from 1 and history
    /// from before is gone; messages not yet read from the old bus are lost
    /// (their number is unknown).
    Reset,
    /// Messages that will never be delivered, counted.
    Lost { count: u64, kind: LostKind },
}

/// Why messages were lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LostKind {
    /// `publish` found the outbound queue full (it also answered [`Full`]).
    /// Reported in batches, as counted since the last report.
    QueueFull,
    /// Redis refused this node's publish or definition `origin_seq` (out of
    /// memory, a key of the wrong type, ...): count is 1.
    Rejected { origin_seq: u64 },
    /// The bus was trimmed past this node's reader (it was disconnected or
    /// slow for longer than `bus_maxlen` messages): messages from any node.
    BusGap,
}

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
    /// Chat presence changes that did not reach Redis (queue full, or
    /// refused): `who` on other nodes may miss or keep those members.
    pub presence_lost: u64,
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

/// `publish` or `history` found the outbound queue full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full;

impl fmt::Display for Full {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("redis link outbound queue is full")
    }
}

impl std::error::Error for Full {}

#[derive(Default)]
struct Counters {
    published: AtomicU64,
    defined: AtomicU64,
    lost_queue_full: AtomicU64,
    lost_rejected: AtomicU64,
    lost_bus_gap: AtomicU64,
    lost_at_shutdown: AtomicU64,
    malformed: AtomicU64,
    duplicates: AtomicU64,
    history_answered: AtomicU64,
    presence_lost: AtomicU64,
    lag_ms: AtomicU64,
    reconnects: AtomicU64,
    connect_failures: AtomicU64,
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Writer,
    Reader,
}

struct Status {
    writer_up: bool,
    reader_up: bool,
    state: LinkState,
    epoch: Option<String>,
    /// Bumped whenever the epoch in Redis changed (a data reset).
    epoch_gen: u64,
    outages: u64,
    resets: u64,
    down_since: Option<Instant>,
    down_total: Duration,
}

struct Shared {
    cfg: LinkConfig,
    /// `host:port` (no credentials), for logs.
    addr: String,
    /// Random per process: publishes of a restarted node never collide with
    /// the dedup state of its previous run.
    instance: String,
    stop: AtomicBool,
    /// The reader has taken its start position on the bus: until then the
    /// writer holds publishes back, so that the node's own reader sees
    /// every message published after `start`.
    reader_ready: AtomicBool,
    outbox: Outbox,
    inbox: Inbox,
    status: Mutex<Status>,
    c: Counters,
    /// Queue-full losses not yet reported as `Inbound::Lost`.
    overflow: AtomicU64,
    next_seq: AtomicU64,
    next_request: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    fn conn_up(&self, side: Side) {
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

    fn conn_down(&self, side: Side, reason: &str) {
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
    fn note_epoch(&self, epoch: String) -> u64 {
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

    fn lost(&self, count: u64, kind: LostKind) {
        if count > 0 {
            self.inbox.push_control(Inbound::Lost { count, kind });
        }
    }

    fn report_overflow(&self) {
        let n = self.overflow.swap(0, Ordering::AcqRel);
        self.lost(n, LostKind::QueueFull);
    }

    /// Answers a read (history, who) with an error.
    fn fail_read(&self, cmd: Command, why: RequestError) {
        match cmd {
            Command::Who { request, room } => self.inbox.push_control(Inbound::Who {
                request,
                room,
                result: Err(why),
            }),
            Command::Rooms { request } => self.inbox.push_control(Inbound::Rooms {
                request,
                result: Err(why),
            }),
            history => self.answer_history(history, Err(why)),
        }
    }

    fn answer_history(&self, cmd: Command, result: Result<History, RequestError>) {
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

    fn stats(&self) -> LinkStats {
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
            presence_lost: load(&self.c.presence_lost),
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

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A Redis server error leaves the connection usable; anything else (I/O,
/// timeout, a reply the client could not parse) does not.
fn is_connection_error(e: &RedisError) -> bool {
    !matches!(e.kind(), ErrorKind::Server(_) | ErrorKind::Extension)
}

/// Redis is there but cannot take writes now (loading its data, a
/// replica, ...): the link waits, as for a broken connection.
fn is_unavailable(e: &RedisError) -> bool {
    e.code().is_some_and(|code| {
        matches!(
            code,
            "LOADING" | "READONLY" | "MASTERDOWN" | "TRYAGAIN" | "BUSY" | "CLUSTERDOWN"
        )
    })
}

/// Logs a repeated warning at most once per [`WARN_INTERVAL`].
struct RateLimited {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimited {
    fn new() -> RateLimited {
        RateLimited {
            last: None,
            suppressed: 0,
        }
    }

    fn warn(&mut self, msg: fmt::Arguments<'_>) {
        if self.last.is_some_and(|t| t.elapsed() < WARN_INTERVAL) {
            self.suppressed += 1;
            return;
        }
        if self.suppressed > 0 {
            log::warn!("{msg} ({} similar warnings suppressed)", self.suppressed);
        } else {
            log::warn!("{msg}");
        }
        self.last = Some(Instant::now());
        self.suppressed = 0;
    }
}

/// Opens one connection with the link's timeouts and a client name.
fn open(
    sh: &Shared,
    client: &Client,
    role: &str,
    read_timeout: Duration,
) -> redis::RedisResult<Connection> {
    let mut con = client.get_connection_with_timeout(sh.cfg.io_timeout)?;
    con.set_read_timeout(Some(read_timeout))?;
    con.set_write_timeout(Some(sh.cfg.io_timeout))?;
    // Visible in CLIENT LIST; a server that refuses it is still usable.
    let name = format!("fanout-{}-{role}", sh.cfg.node_id);
    if let Err(e) = redis::cmd("CLIENT")
        .arg("SETNAME")
        .arg(name)
        .query::<Value>(&mut con)
    {
        if is_connection_error(&e) {
            return Err(e);
        }
    }
    Ok(con)
}

/// `SET epoch NX` + `GET epoch` in one transaction; answers the epoch
/// generation after recording what Redis holds.
fn sync_epoch(sh: &Shared, con: &mut Connection) -> Result<u64, ConnectError> {
    let candidate = format!("{:016x}", protocol::random_u64());
    let reply = redis::pipe()
        .atomic()
        .cmd("SET")
        .arg(EPOCH_KEY)
        .arg(candidate)
        .arg("NX")
        .ignore()
        .cmd("GET")
        .arg(EPOCH_KEY)
        .query::<Value>(con)?;
    Ok(sh.note_epoch(protocol::parse_epoch(reply)?))
}

/// Sets a node run's alive key for `ttl` (whole seconds, at least 1).
fn set_alive(con: &mut Connection, key: &str, ttl: Duration) -> redis::RedisResult<Value> {
    redis::cmd("SET")
        .arg(key)
        .arg(1)
        .arg("EX")
        .arg(ttl.as_secs().max(1))
        .query::<Value>(con)
}

/// Sleeps `d` in short steps, returning early when the link stops.
fn nap(sh: &Shared, d: Duration) {
    let deadline = Instant::now() + d;
    while !sh.stopping() {
        let now = Instant::now();
        if now >= deadline {
            return;
        }
        std::thread::sleep((deadline - now).min(TICK / 2));
    }
}

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
        let sh = Arc::new(Shared {
            addr,
            instance: format!("{:016x}", protocol::random_u64()),
            stop: AtomicBool::new(false),
            reader_ready: AtomicBool::new(false),
            outbox: Outbox::new(config.outbound_queue),
            inbox: Inbox::new(config.inbound_queue, waker),
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
            cfg: config,
        });
        let seed = protocol::random_u64();
        let writer = Writer {
            sh: sh.clone(),
            client: client.clone(),
            conn: None,
            script: Script::new(PUBLISH_LUA),
            define_script: Script::new(DEFINE_LUA),
            who_script: Script::new(WHO_LUA),
            nick_script: Script::new(NICK_CLAIM_LUA),
            rooms_script: Script::new(ROOMS_LUA),
            alive_key: alive_key(&sh.cfg.node_id, &sh.instance),
            backoff: Backoff::new(sh.cfg.reconnect_min, sh.cfg.reconnect_max, seed),
            down: false,
            connected_before: false,
            batch: Vec::new(),
            dseqs: Vec::new(),
            next_dseq: 0,
            noscript_rounds: 0,
            dedup_key: dedup_key(&sh.cfg.node_id, &sh.instance),
            last_heartbeat: Instant::now(),
            rejected_warn: RateLimited::new(),
        };
        let reader = Reader {
            sh: sh.clone(),
            client,
            conn: None,
            backoff: Backoff::new(
                sh.cfg.reconnect_min,
                sh.cfg.reconnect_max,
                seed.rotate_left(17),
            ),
            down: false,
            connected_before: false,
            last_id: None,
            last_bseq: 0,
            epoch_gen: 0,
            staged: VecDeque::new(),
            malformed_warn: RateLimited::new(),
        };
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

    /// Chat presence: member `member` (unique on this node while it is a
    /// member) of `room` has `nick` now, or left it (None). Never blocks;
    /// applied in order. On [`Full`] it is counted in `presence_lost`.
    pub fn presence(&self, room: &str, member: u64, nick: Option<&str>) -> Result<(), Full> {
        let cmd = Command::Presence {
            room: room.to_string(),
            member,
            nick: nick.map(str::to_string),
        };
        self.sh.outbox.push(cmd).map_err(|_| {
            add(&self.sh.c.presence_lost, 1);
            Full
        })
    }

    /// Reserves `nick` for `member` in Redis, releasing its `previous`
    /// nick, unless a member of a live node holds it; never blocks. The
    /// answer comes back as [`Inbound::Nick`], after this link's earlier
    /// presence changes and releases. While Redis is unreachable the claim
    /// waits (the caller decides locally meanwhile) and is answered after
    /// reconnection. On [`Full`] it is counted in `presence_lost`.
    pub fn claim_nick(&self, member: u64, nick: &str, previous: Option<&str>) -> Result<u64, Full> {
        let request = self.sh.next_request.fetch_add(1, Ordering::Relaxed) + 1;
        let cmd = Command::NickClaim {
            request,
            member,
            nick: nick.to_string(),
            previous: previous.map(str::to_string),
        };
        self.sh.outbox.push(cmd).map(|()| request).map_err(|_| {
            add(&self.sh.c.presence_lost, 1);
            Full
        })
    }

    /// Releases `member`'s `nick` (if it still holds it); never blocks,
    /// applied in order. On [`Full`] it is counted in `presence_lost` (the
    /// nick is freed when this node's alive key goes).
    pub fn release_nick(&self, member: u64, nick: &str) -> Result<(), Full> {
        let cmd = Command::NickRelease {
            member,
            nick: nick.to_string(),
        };
        self.sh.outbox.push(cmd).map_err(|_| {
            add(&self.sh.c.presence_lost, 1);
            Full
        })
    }

    /// Asks for the nicks of `room`'s members on every live node; never
    /// blocks. The answer comes back as [`Inbound::Who`], after this link's
    /// earlier presence changes were applied. While Redis is unreachable
    /// the answer is an error, at once.
    pub fn who(&self, room: &str) -> Result<u64, Full> {
        let request = self.sh.next_request.fetch_add(1, Ordering::Relaxed) + 1;
        let cmd = Command::Who {
            request,
            room: room.to_string(),
        };
        self.sh.outbox.push(cmd).map(|()| request).map_err(|_| Full)
    }

    /// Asks for every room's member count on every live node; never
    /// blocks. Answered like [`RedisLink::who`], as [`Inbound::Rooms`].
    pub fn rooms(&self) -> Result<u64, Full> {
        let request = self.sh.next_request.fetch_add(1, Ordering::Relaxed) + 1;
        let cmd = Command::Rooms { request };
        self.sh.outbox.push(cmd).map(|()| request).map_err(|_| Full)
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

/// The writer thread: publishes and definitions (pipelined, through their
/// scripts)
/// and history requests, on its own connection.
struct Writer {
    sh: Arc<Shared>,
    client: Client,
    conn: Option<Connection>,
    script: Script,
    define_script: Script,
    who_script: Script,
    rooms_script: Script,
    nick_script: Script,
    /// This node run's alive key (chat presence).
    alive_key: String,
    backoff: Backoff,
    /// Reported down; the next connect waits for the backoff first.
    down: bool,
    connected_before: bool,
    /// Commands taken from the outbox, not finished yet.
    batch: Vec<Command>,
    /// Per publish in `batch`: the dedup sequence it was last sent with, 0
    /// when it was never sent or Redis certainly did not apply it.
    dseqs: Vec<u64>,
    next_dseq: u64,
    noscript_rounds: u32,
    dedup_key: String,
    /// When the alive key was last refreshed.
    last_heartbeat: Instant,
    rejected_warn: RateLimited,
}

impl Writer {
    fn run(mut self) {
        while !self.sh.stopping() {
            self.sh.report_overflow();
            if self.conn.is_none() && !self.connect() {
                continue;
            }
            self.heartbeat();
            if self.conn.is_none() {
                continue;
            }
            if !self.sh.reader_ready.load(Ordering::Acquire) {
                self.sh
                    .outbox
                    .sleep_until(Instant::now() + TICK / 4, &self.sh.stop);
                continue;
            }
            if self.batch.is_empty() {
                self.sh
                    .outbox
                    .take_batch(self.sh.cfg.batch, TICK, &self.sh.stop, &mut self.batch);
                self.dseqs.clear();
                self.dseqs.resize(self.batch.len(), 0);
                if self.batch.is_empty() {
                    continue;
                }
            }
            self.process();
        }
        self.finish();
    }

    fn process(&mut self) {
        match self.batch.first() {
            Some(Command::History { .. }) => self.run_history(),
            Some(Command::Who { .. }) => self.run_who(),
            Some(Command::Rooms { .. }) => self.run_rooms(),
            Some(Command::NickClaim { .. }) => self.run_nick_claim(),
            Some(Command::Presence { .. } | Command::NickRelease { .. }) => self.run_presence(),
            _ => self.run_publishes(),
        }
    }

    /// Connects (after the backoff delay when down). Answers whether the
    /// writer is connected.
    fn connect(&mut self) -> bool {
        if self.down {
            let deadline = Instant::now() + self.backoff.next_delay();
            while !self.sh.stopping() && Instant::now() < deadline {
                self.fail_reads(RequestError::Down);
                self.sh.report_overflow();
                self.sh.outbox.sleep_until(deadline, &self.sh.stop);
            }
            if self.sh.stopping() {
                return false;
            }
        }
        match self.try_connect() {
            Ok(()) => true,
            Err(reason) => {
                self.down = true;
                self.sh.conn_down(Side::Writer, &reason.to_string());
                false
            }
        }
    }

    fn try_connect(&mut self) -> Result<(), ConnectError> {
        let result = (|| {
            let mut con = open(&self.sh, &self.client, "writer", self.sh.cfg.io_timeout)?;
            for script in [&self.script, &self.define_script] {
                script
                    .prepare_invoke()
                    .load(&mut con)
                    .map_err(ConnectError::ScriptLoad)?;
            }
            sync_epoch(&self.sh, &mut con)?;
            // Alive before any presence of this run is (re)written; a
            // refusal (out of memory) is the heartbeat's to report.
            match set_alive(&mut con, &self.alive_key, self.sh.cfg.presence_ttl) {
                Err(e) if is_connection_error(&e) || is_unavailable(&e) => {
                    return Err(ConnectError::SetAlive(e))
                }
                _ => {}
            }
            Ok(con)
        })();
        match result {
            Ok(con) => {
                self.conn = Some(con);
                self.last_heartbeat = Instant::now();
                if self.connected_before {
                    add(&self.sh.c.reconnects, 1);
                }
                self.connected_before = true;
                self.down = false;
                self.backoff.reset();
                self.sh.conn_up(Side::Writer);
                Ok(())
            }
            Err(e) => {
                add(&self.sh.c.connect_failures, 1);
                Err(e)
            }
        }
    }

    /// The connection broke: one immediate retry (a stale connection after
    /// a quick Redis restart is not an outage), else report down.
    fn connection_failed(&mut self, e: &RedisError) {
        self.conn = None;
        if self.sh.stopping() {
            return;
        }
        if let Err(again) = self.try_connect() {
            log::debug!("redis writer: {e}; reconnecting: {again}");
            self.down = true;
            self.sh.conn_down(Side::Writer, &e.to_string());
        }
    }

    /// Answers queued reads with an error (Redis unreachable).
    fn fail_reads(&mut self, why: RequestError) {
        if matches!(
            self.batch.first(),
            Some(Command::History { .. } | Command::Who { .. } | Command::Rooms { .. })
        ) {
            let cmd = self.batch.remove(0);
            self.dseqs.clear();
            self.sh.outbox.done(1);
            self.sh.fail_read(cmd, why.clone());
        }
        for cmd in self.sh.outbox.take_reads() {
            self.sh.fail_read(cmd, why.clone());
        }
    }

    /// Refreshes the alive key every [`HEALTH_INTERVAL`], busy or idle;
    /// when idle this is also what notices a dead connection.
    fn heartbeat(&mut self) {
        if self.last_heartbeat.elapsed() < HEALTH_INTERVAL {
            return;
        }
        let Some(con) = self.conn.as_mut() else {
            return;
        };
        self.last_heartbeat = Instant::now();
        match set_alive(con, &self.alive_key, self.sh.cfg.presence_ttl) {
            Ok(_) => {}
            Err(e) if is_connection_error(&e) => self.connection_failed(&e),
            // LOADING and the like: Redis is there but cannot serve yet.
            Err(e) if is_unavailable(&e) => {
                self.conn = None;
                self.down = true;
                self.sh.conn_down(Side::Writer, &e.to_string());
            }
            // Out of memory and the like refuse this write, not the link:
            // publishes are judged one by one.
            Err(e) => self.rejected_warn.warn(format_args!(
                "redis link: node {} could not refresh its chat presence ({e}); other nodes \
                 stop listing its members after {:?}",
                self.sh.cfg.node_id, self.sh.cfg.presence_ttl
            )),
        }
    }

    fn run_history(&mut self) {
        let Some(Command::History {
            channel,
            after_offset,
            limit,
            newest,
            ..
        }) = self.batch.first()
        else {
            return;
        };
        let (after_offset, limit, newest) = (*after_offset, *limit, *newest);
        let Some(con) = self.conn.as_mut() else {
            return;
        };
        let mut pipe = redis::pipe();
        pipe.atomic();
        if newest {
            pipe.cmd("XREVRANGE")
                .arg(channel_key(channel))
                .arg("+")
                .arg("-");
        } else {
            pipe.cmd("XRANGE")
                .arg(channel_key(channel))
                .arg(format!("0-{}", after_offset.saturating_add(1)))
                .arg("+");
        }
        let reply = pipe
            .arg("COUNT")
            .arg(limit)
            .cmd("GET")
            .arg(offset_key(channel))
            .query::<Value>(con);
        let result = match reply {
            Ok(v) if newest => protocol::parse_recent_reply(v).map_err(RequestError::from),
            Ok(v) => {
                protocol::parse_history_reply(v, after_offset, limit).map_err(RequestError::from)
            }
            Err(e) => {
                let why = RequestError::of(&e);
                if is_connection_error(&e) {
                    self.connection_failed(&e);
                }
                Err(why)
            }
        };
        let cmd = self.batch.remove(0);
        self.dseqs.clear();
        self.sh.outbox.done(1);
        self.sh.answer_history(cmd, result);
    }

    fn run_who(&mut self) {
        let Some(Command::Who { room, .. }) = self.batch.first() else {
            return;
        };
        let Some(con) = self.conn.as_mut() else {
            return;
        };
        // `invoke` loads the script when Redis's cache lacks it.
        let reply = self
            .who_script
            .key(room_key(room))
            .arg(ALIVE_PREFIX)
            .invoke::<Value>(con);
        let result = match reply {
            Ok(v) => protocol::parse_who(v).map_err(RequestError::from),
            Err(e) => {
                let why = RequestError::of(&e);
                if is_connection_error(&e) {
                    self.connection_failed(&e);
                }
                Err(why)
            }
        };
        let Command::Who { request, room } = self.batch.remove(0) else {
            return;
        };
        self.dseqs.clear();
        self.sh.outbox.done(1);
        self.sh.inbox.push_control(Inbound::Who {
            request,
            room,
            result,
        });
    }

    fn run_rooms(&mut self) {
        let Some(con) = self.conn.as_mut() else {
            return;
        };
        let reply = self
            .rooms_script
            .key(ROOMS_KEY)
            .arg(ALIVE_PREFIX)
            .arg(room_key(""))
            .invoke::<Value>(con);
        let result = match reply {
            Ok(v) => protocol::parse_rooms(v).map_err(RequestError::from),
            Err(e) => {
                let why = RequestError::of(&e);
                if is_connection_error(&e) {
                    self.connection_failed(&e);
                }
                Err(why)
            }
        };
        let Command::Rooms { request } = self.batch.remove(0) else {
            return;
        };
        self.dseqs.clear();
        self.sh.outbox.done(1);
        self.sh
            .inbox
            .push_control(Inbound::Rooms { request, result });
    }

    /// A nick claim. A broken connection leaves it first in the batch, so
    /// it is sent again after reconnecting (the script is idempotent).
    fn run_nick_claim(&mut self) {
        let Some(Command::NickClaim {
            member,
            nick,
            previous,
            ..
        }) = self.batch.first()
        else {
            return;
        };
        let Some(con) = self.conn.as_mut() else {
            return;
        };
        let owner = presence_field(&self.sh.cfg.node_id, &self.sh.instance, *member);
        let previous = previous.as_deref().unwrap_or(nick);
        let reply = self
            .nick_script
            .key(nick_key(nick))
            .key(nick_key(previous))
            .arg(owner)
            .arg(ALIVE_PREFIX)
            .invoke::<Value>(con);
        let result = match reply {
            Ok(v) => protocol::parse_nick_claim(v).map_err(RequestError::from),
            Err(e) if is_connection_error(&e) => return self.connection_failed(&e),
            Err(e) if is_unavailable(&e) => {
                self.conn = None;
                self.down = true;
                self.sh.conn_down(Side::Writer, &e.to_string());
                return;
            }
            Err(e) => Err(RequestError::Redis(e.to_string())),
        };
        let Command::NickClaim { request, nick, .. } = self.batch.remove(0) else {
            return;
        };
        self.dseqs.clear();
        self.sh.outbox.done(1);
        self.sh.inbox.push_control(Inbound::Nick {
            request,
            nick,
            result,
        });
    }

    /// The replies of a pipeline run with `ignore_errors`, if there are
    /// `expected` of them (any number when `None`). Otherwise the connection
    /// is dropped: a broken one is reported, and a reply of another shape
    /// (not expected with `ignore_errors`) is treated like a broken
    /// connection, after which the callers resend safely.
    fn pipeline_replies(
        &mut self,
        reply: redis::RedisResult<Value>,
        expected: Option<usize>,
    ) -> Option<Vec<Value>> {
        match reply {
            Ok(Value::Array(replies)) if expected.is_none_or(|n| replies.len() == n) => {
                Some(replies)
            }
            Ok(other) => {
                let e = RedisError::from((
                    ErrorKind::Client,
                    "unexpected pipeline reply",
                    protocol::kind(&other).to_string(),
                ));
                self.connection_failed(&e);
                None
            }
            Err(e) => {
                if is_connection_error(&e) {
                    self.connection_failed(&e);
                } else {
                    self.conn = None;
                }
                None
            }
        }
    }

    /// A run of presence changes, pipelined. Each is idempotent, so after
    /// a broken connection the whole run is sent again.
    fn run_presence(&mut self) {
        let Some(con) = self.conn.as_mut() else {
            return;
        };
        let cfg = &self.sh.cfg;
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for cmd in &self.batch {
            match cmd {
                Command::Presence { room, member, nick } => {
                    let field = presence_field(&cfg.node_id, &self.sh.instance, *member);
                    match nick {
                        Some(nick) => pipe
                            .cmd("HSET")
                            .arg(room_key(room))
                            .arg(field)
                            .arg(nick)
                            .cmd("SADD")
                            .arg(ROOMS_KEY)
                            .arg(room),
                        None => pipe.cmd("HDEL").arg(room_key(room)).arg(field),
                    };
                }
                Command::NickRelease { member, nick } => {
                    let field = presence_field(&cfg.node_id, &self.sh.instance, *member);
                    pipe.cmd("EVAL")
                        .arg(NICK_RELEASE_LUA)
                        .arg(1)
                        .arg(nick_key(nick))
                        .arg(field);
                }
                _ => {}
            }
        }
        let reply = pipe.query::<Value>(con);
        let Some(replies) = self.pipeline_replies(reply, None) else {
            return;
        };
        let refused: Vec<String> = replies
            .into_iter()
            .filter_map(|r| match r {
                Value::ServerError(e) => {
                    Some(format!("{} {}", e.code(), e.details().unwrap_or("")))
                }
                _ => None,
            })
            .collect();
        if let Some(why) = refused.first() {
            add(&self.sh.c.presence_lost, refused.len() as u64);
            self.rejected_warn.warn(format_args!(
                "redis link: {} chat presence change(s) of node {} refused by redis ({why})",
                refused.len(),
                self.sh.cfg.node_id
            ));
        }
        self.sh.outbox.done(self.batch.len());
        self.batch.clear();
        self.dseqs.clear();
    }

    fn run_publishes(&mut self) {
        let Some(con) = self.conn.as_mut() else {
            return;
        };
        let cfg = &self.sh.cfg;
        let hash = self.script.get_hash();
        let define_hash = self.define_script.get_hash();
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        // Loading the script first in the same pipeline means no EVALSHA of
        // this batch can meet an empty script cache (Redis restarted, or
        // another client's SCRIPT FLUSH) -- except by a flush racing the
        // pipeline, which is handled below.
        pipe.cmd("SCRIPT").arg("LOAD").arg(PUBLISH_LUA);
        pipe.cmd("SCRIPT").arg("LOAD").arg(DEFINE_LUA);
        for (cmd, dseq) in self.batch.iter().zip(self.dseqs.iter_mut()) {
            if *dseq == 0 {
                self.next_dseq += 1;
                *dseq = self.next_dseq;
            }
            let (id, channel, payload) = match cmd {
                Command::Publish {
                    id,
                    channel,
                    payload,
                } => (id, channel, payload),
                Command::Define {
                    id,
                    channel,
                    definition,
                } => {
                    pipe.cmd("EVALSHA")
                        .arg(define_hash)
                        .arg(4)
                        .arg(DEFINITIONS_KEY)
                        .arg(BUS_KEY)
                        .arg(BUS_SEQ_KEY)
                        .arg(&self.dedup_key)
                        .arg(channel)
                        .arg(definition.as_str())
                        .arg(&cfg.node_id)
                        .arg(*id)
                        .arg(cfg.bus_maxlen)
                        .arg(DEDUP_TTL_SECS)
                        .arg(*dseq);
                    continue;
                }
                // Never in a write batch (`take_batch` keeps them apart).
                Command::History { .. }
                | Command::Who { .. }
                | Command::Rooms { .. }
                | Command::Presence { .. }
                | Command::NickClaim { .. }
                | Command::NickRelease { .. } => continue,
            };
            pipe.cmd("EVALSHA")
                .arg(hash)
                .arg(5)
                .arg(offset_key(channel))
                .arg(channel_key(channel))
                .arg(BUS_KEY)
                .arg(BUS_SEQ_KEY)
                .arg(&self.dedup_key)
                .arg(channel)
                .arg(&cfg.node_id)
                .arg(*id)
                .arg(payload.as_str())
                .arg(cfg.stream_maxlen)
                .arg(cfg.bus_maxlen)
                .arg(DEDUP_TTL_SECS)
                .arg(*dseq);
        }
        let reply = pipe.query::<Value>(con);
        // Two `SCRIPT LOAD`s, then one reply per command. Any other reply
        // cannot tell what was applied: the batch is resent after a
        // reconnect (the dedup sequence keeps that exactly-once).
        let Some(replies) = self.pipeline_replies(reply, Some(self.batch.len() + 2)) else {
            return;
        };
        let outcomes: Vec<PublishReply> = replies
            .into_iter()
            .skip(2)
            .map(protocol::publish_reply)
            .collect();
        // A publish that certainly did not apply is resent only if no later
        // one of the batch applied: resending it then would reorder this
        // node's messages, so it is reported lost instead.
        let last_applied = outcomes
            .iter()
            .rposition(|o| matches!(o, PublishReply::Offset(_) | PublishReply::Duplicate));
        let mut retry = vec![false; outcomes.len()];
        let mut transient: Option<String> = None;
        let mut noscript = false;
        for (i, outcome) in outcomes.into_iter().enumerate() {
            let resendable = last_applied.is_none_or(|j| j < i);
            let (id, applied) = match &self.batch[i] {
                Command::Publish { id, .. } => (*id, &self.sh.c.published),
                Command::Define { id, .. } => (*id, &self.sh.c.defined),
                Command::History { .. }
                | Command::Who { .. }
                | Command::Rooms { .. }
                | Command::Presence { .. }
                | Command::NickClaim { .. }
                | Command::NickRelease { .. } => (0, &self.sh.c.published),
            };
            match outcome {
                PublishReply::Offset(_) => add(applied, 1),
                PublishReply::Duplicate => {
                    add(applied, 1);
                    add(&self.sh.c.duplicates, 1);
                }
                PublishReply::NoScript if resendable => {
                    noscript = true;
                    retry[i] = true;
                }
                PublishReply::Transient(why) if resendable => {
                    transient.get_or_insert(why);
                    retry[i] = true;
                }
                PublishReply::NoScript => self.reject(id, "NOSCRIPT while later publishes applied"),
                PublishReply::Transient(why) | PublishReply::Failed(why) => self.reject(id, &why),
            }
        }
        if noscript {
            self.noscript_rounds += 1;
            if self.noscript_rounds > 3 {
                // The script keeps vanishing: give these up rather than spin.
                for (i, r) in retry.iter_mut().enumerate() {
                    if std::mem::take(r) {
                        let id = match &self.batch[i] {
                            Command::Publish { id, .. } | Command::Define { id, .. } => *id,
                            _ => 0,
                        };
                        self.reject(id, "NOSCRIPT after reloading the script");
                    }
                }
                self.noscript_rounds = 0;
            }
        } else {
            self.noscript_rounds = 0;
        }
        // Keep the ones to resend, with a fresh dedup sequence (they were
        // certainly not applied).
        let mut finished = 0;
        let mut keep = Vec::new();
        for (cmd, r) in std::mem::take(&mut self.batch).into_iter().zip(retry) {
            if r {
                keep.push(cmd);
            } else {
                finished += 1;
            }
        }
        self.batch = keep;
        self.dseqs.clear();
        self.dseqs.resize(self.batch.len(), 0);
        self.sh.outbox.done(finished);
        if let Some(why) = transient {
            // LOADING, READONLY, ...: this server cannot take writes now.
            self.conn = None;
            self.down = true;
            self.sh.conn_down(Side::Writer, &why);
        }
    }

    fn reject(&mut self, origin_seq: u64, why: &str) {
        add(&self.sh.c.lost_rejected, 1);
        self.rejected_warn.warn(format_args!(
            "redis link: publish or definition {origin_seq} of node {} was refused by redis ({why}); it is lost",
            self.sh.cfg.node_id
        ));
        self.sh.lost(1, LostKind::Rejected { origin_seq });
    }

    /// Shutdown: flush what is queued while connected, for up to half the
    /// shutdown timeout; count the rest as lost.
    fn finish(&mut self) {
        let deadline = Instant::now() + self.sh.cfg.shutdown_timeout / 2;
        while self.conn.is_some() && Instant::now() < deadline {
            if self.batch.is_empty() {
                self.sh.outbox.take_batch(
                    self.sh.cfg.batch,
                    Duration::ZERO,
                    &self.sh.stop,
                    &mut self.batch,
                );
                self.dseqs.clear();
                self.dseqs.resize(self.batch.len(), 0);
                if self.batch.is_empty() {
                    break;
                }
            }
            self.process();
        }
        let left = self
            .batch
            .drain(..)
            .chain(self.sh.outbox.take_all())
            .filter(|c| matches!(c, Command::Publish { .. } | Command::Define { .. }))
            .count() as u64;
        // This run's room members are gone with it, at once (not after
        // presence_ttl).
        if let Some(con) = self.conn.as_mut() {
            if let Err(e) = redis::cmd("DEL").arg(&self.alive_key).query::<Value>(con) {
                log::debug!("redis writer: could not clear the alive key at shutdown: {e}");
            }
        }
        if left > 0 {
            add(&self.sh.c.lost_at_shutdown, left);
            log::warn!(
                "redis link: {left} queued publish(es) and definition(s) were not sent before shutdown"
            );
        }
    }
}

/// The reader thread: `XREAD BLOCK` on the bus from the last seen ID, on
/// its own connection.
struct Reader {
    sh: Arc<Shared>,
    client: Client,
    conn: Option<Connection>,
    backoff: Backoff,
    down: bool,
    connected_before: bool,
    /// The last bus entry read; `None` before the first connection.
    last_id: Option<StreamId>,
    /// Its bus sequence number (gap detection).
    last_bseq: u64,
    epoch_gen: u64,
    staged: VecDeque<Inbound>,
    malformed_warn: RateLimited,
}

impl Reader {
    fn run(mut self) {
        while !self.sh.stopping() {
            if self.conn.is_none() && !self.connect() {
                continue;
            }
            self.read_once();
        }
    }

    fn connect(&mut self) -> bool {
        if self.down {
            nap(&self.sh, self.backoff.next_delay());
            if self.sh.stopping() {
                return false;
            }
        }
        match self.try_connect() {
            Ok(()) => true,
            Err(reason) => {
                self.down = true;
                self.sh.conn_down(Side::Reader, &reason.to_string());
                false
            }
        }
    }

    fn try_connect(&mut self) -> Result<(), ConnectError> {
        let cfg = &self.sh.cfg;
        let result = (|| {
            let mut con = open(
                &self.sh,
                &self.client,
                "reader",
                cfg.read_block + cfg.io_timeout,
            )?;
            let generation = sync_epoch(&self.sh, &mut con)?;
            let position = redis::pipe()
                .atomic()
                .cmd("XREVRANGE")
                .arg(BUS_KEY)
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(1)
                .cmd("GET")
                .arg(BUS_SEQ_KEY)
                .cmd("HGETALL")
                .arg(DEFINITIONS_KEY)
                .query::<Value>(&mut con)?;
            let position = protocol::parse_bus_position(position)?;
            Ok((con, generation, position))
        })();
        match result {
            Ok((con, generation, position)) => {
                let protocol::BusPosition {
                    top,
                    bseq: counter,
                    definitions,
                    unreadable,
                } = position;
                if unreadable > 0 {
                    add(&self.sh.c.malformed, unreadable);
                    self.malformed_warn.warn(format_args!(
                        "redis reader: {unreadable} channel definition(s) in {DEFINITIONS_KEY} are not UTF-8; skipped"
                    ));
                }
                match self.last_id {
                    // First connection: only messages from now on.
                    None => {
                        self.last_id = Some(top);
                        self.last_bseq = counter;
                    }
                    // The bus started over (Redis lost its data): everything
                    // on it is new to this reader.
                    Some(_) if generation != self.epoch_gen || counter < self.last_bseq => {
                        self.last_id = Some(StreamId { ms: 0, seq: 0 });
                        self.last_bseq = 0;
                    }
                    // Otherwise resume after the last entry read.
                    Some(_) => {}
                }
                self.epoch_gen = generation;
                // Read in the same transaction as the position: every
                // definition is either in here or on the bus after it.
                self.sh
                    .inbox
                    .push_control(Inbound::Definitions { definitions });
                self.conn = Some(con);
                self.sh.reader_ready.store(true, Ordering::Release);
                if self.connected_before {
                    add(&self.sh.c.reconnects, 1);
                }
                self.connected_before = true;
                self.down = false;
                self.backoff.reset();
                self.sh.conn_up(Side::Reader);
                Ok(())
            }
            Err(e) => {
                add(&self.sh.c.connect_failures, 1);
                Err(e)
            }
        }
    }

    fn failed(&mut self, e: &RedisError) {
        self.conn = None;
        if self.sh.stopping() {
            return;
        }
        if is_connection_error(e) {
            match self.try_connect() {
                Ok(()) => return,
                Err(again) => log::debug!("redis reader: {e}; reconnecting: {again}"),
            }
        }
        self.down = true;
        self.sh.conn_down(Side::Reader, &e.to_string());
    }

    fn read_once(&mut self) {
        let Some(con) = self.conn.as_mut() else {
            return;
        };
        let from = self
            .last_id
            .unwrap_or(StreamId { ms: 0, seq: 0 })
            .to_string();
        let block_ms = u64::try_from(self.sh.cfg.read_block.as_millis()).unwrap_or(u64::MAX);
        let reply = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(self.sh.cfg.batch)
            .arg("BLOCK")
            .arg(block_ms)
            .arg("STREAMS")
            .arg(BUS_KEY)
            .arg(from)
            .query::<Value>(con);
        match reply {
            Ok(v) => self.deliver(v),
            Err(e) => self.failed(&e),
        }
    }

    fn deliver(&mut self, v: Value) {
        let entries = match protocol::parse_xread(v, BUS_KEY) {
            Ok(entries) => entries,
            Err(why) => {
                self.malformed_warn.warn(format_args!(
                    "redis reader: unreadable XREAD reply ({why}); reconnecting"
                ));
                self.conn = None;
                return;
            }
        };
        let Some(last) = entries.last() else {
            self.sh.c.lag_ms.store(0, Ordering::Relaxed);
            return;
        };
        if let Some(id) = StreamId::parse(&last.id) {
            let now_ms = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(millis)
                .unwrap_or(0);
            self.sh
                .c
                .lag_ms
                .store(now_ms.saturating_sub(id.ms), Ordering::Relaxed);
        }
        let mut restarted = false;
        for raw in entries {
            let Some(raw_id) = StreamId::parse(&raw.id) else {
                // Redis never sends this; re-reading would spin on it.
                add(&self.sh.c.malformed, 1);
                self.conn = None;
                break;
            };
            match protocol::bus_item(raw) {
                Ok(item) => {
                    let bseq = item.bseq();
                    if bseq > self.last_bseq.saturating_add(1) {
                        let gap = bseq - self.last_bseq - 1;
                        add(&self.sh.c.lost_bus_gap, gap);
                        self.staged.push_back(Inbound::Lost {
                            count: gap,
                            kind: LostKind::BusGap,
                        });
                    } else if bseq <= self.last_bseq {
                        restarted = true;
                    }
                    self.last_bseq = bseq;
                    self.staged.push_back(match item {
                        BusItem::Message(e) => Inbound::Message {
                            channel: e.channel,
                            offset: e.offset,
                            origin: e.origin,
                            origin_seq: e.origin_seq,
                            payload: e.payload,
                        },
                        BusItem::Definition(d) => Inbound::Definition {
                            channel: d.channel,
                            definition: d.definition,
                            created: d.created,
                            origin: d.origin,
                            origin_seq: d.origin_seq,
                        },
                    });
                }
                Err(why) => {
                    add(&self.sh.c.malformed, 1);
                    self.malformed_warn
                        .warn(format_args!("redis reader: skipped a bus entry: {why}"));
                }
            }
            self.last_id = Some(raw_id);
        }
        if restarted {
            // The bus sequence went back: Redis was flushed under a live
            // connection. Let the epoch tell (and report) it.
            log::warn!("redis reader: the bus sequence went back; redis lost its data");
            if let Some(con) = self.conn.as_mut() {
                match sync_epoch(&self.sh, con) {
                    Ok(generation) => self.epoch_gen = generation,
                    Err(e) => log::debug!("redis reader: epoch check failed: {e}"),
                }
            }
        }
        self.sh.inbox.push_messages(&mut self.staged, &self.sh.stop);
        self.staged.clear();
    }
}
