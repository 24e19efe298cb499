//! What each endpoint does with messages. Nothing here knows about
//! sockets: the server hands the app (connection, message) pairs and an
//! [`Outbox`] to answer through, addressed by connection id. A message for
//! many recipients is encoded once as a [`SharedFrame`] and handed to each.
//!
//! This file holds the [`App`] the event loop owns and its dispatch by
//! endpoint; each concern lives in its own module:
//!
//! * `router`: the `/ws` request router (parse, authorise, call a
//!   domain, reply) and the `/kline` text protocol's entry;
//! * [`channels`], [`chat`], [`events`], [`market`]: the domains;
//! * [`bus`]: how what every node must see alike gets there, on a single
//!   node or through Redis; `publishing` and `scale_out` are the app's
//!   side of it for channels and for what Redis hands back;
//! * [`sinks`]: alert firings and chosen channels delivered outside
//!   (webhooks, Telegram) by worker threads;
//! * `metrics`: the app's part of `GET /metrics`.
//!
//! The app is split in two values: the [`Bus`] and the `Node` (everything
//! this node holds). A function that talks to Redis takes the Redis bus as
//! an argument next to `&mut Node`, so that "called with a cluster" is a
//! type, not a runtime expectation.

mod auth;
pub mod bus;
pub mod channels;
pub mod chat;
pub mod events;
pub mod market;
mod metrics;
pub mod protocol;
mod publishing;
mod router;
pub mod routes;
mod scale_out;
pub mod sinks;
pub mod tokens;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use self::auth::KeyRing;
use self::bus::{Bus, RedisBus, Reply, Transport};
use self::channels::{ChannelLimits, Channels};
use self::chat::Chat;
use self::events::stream::EventStreams;
use self::market::Market;
use self::protocol::{error, ProtocolError};
use self::sinks::Sinks;
use self::tokens::{Grant, Grants, KeyFiles, Refusal, RefusalKind, TokenKeys, TokenVerifier};
use crate::cluster::RedisLink;
use crate::config::Config;
use crate::ws::CloseCode;
pub use crate::ws::SharedFrame;
pub use routes::{resolve, Endpoint, Intake, Target};

/// Identifies a WebSocket connection for as long as it is open. The server
/// calls [`App::on_close`] before an id can be reused.
pub type ConnId = usize;

/// The self-contained web page served at `/`.
pub const PAGE_HTML: &str = include_str!("page.html");

/// The channel every fired alert is also published on.
pub const ALERTS_CHANNEL: &str = "alerts";

/// The channel whose messages feed the registration event streams.
pub const EVENTS_CHANNEL: &str = "events";

/// What kind of listener a connection came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Internet-facing: subscribe only, unless the client presents a key.
    Public,
    /// Private network: trusted publishers.
    Internal,
}

/// What the server knows about a connection when it opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnInfo {
    pub role: Role,
    pub peer: SocketAddr,
}

/// A data message received from, or sent to, a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message<'a> {
    Text(&'a str),
    Binary(&'a [u8]),
}

/// How the app sends. The server implements it over its connection table.
pub trait Outbox {
    /// A reply to something the recipient itself asked for. When the
    /// recipient's queue is full the server stops reading its requests
    /// until the queue drains (TCP backpressure): nothing is dropped.
    fn reply(&mut self, to: ConnId, message: Message<'_>);

    /// Like `reply`, for a frame that is already encoded and shared.
    fn reply_shared(&mut self, to: ConnId, frame: &SharedFrame);

    /// Fan-out: queues a shared frame unless the recipient's queue is full.
    /// Returns false when it was not queued; the server then calls
    /// [`App::on_drained`] once that queue has emptied (and the states it
    /// held, if any, are queued).
    fn deliver(&mut self, to: ConnId, frame: &SharedFrame) -> bool;

    /// Fan-out of a state (a candle, the end of a replay) rather than an
    /// event: a later state with the same `key` supersedes this one. Queued
    /// like [`Outbox::deliver`] while the recipient keeps up; while its
    /// queue is full (or earlier states still wait) the server holds the
    /// latest state per key instead of dropping it, at most
    /// `--max-pending-states` keys per [`StateKey::stream`], and queues
    /// them in key order once there is room. Never dropped silently: the
    /// answer says what happened, and [`App::on_drained`] follows once
    /// the held states are queued.
    fn deliver_state(&mut self, to: ConnId, key: StateKey, frame: &SharedFrame) -> StateDelivery;

    /// Forgets the states held for `to` on `stream` (it unsubscribed).
    fn discard_states(&mut self, to: ConnId, stream: u64);

    /// Closes a connection with a close frame.
    fn close(&mut self, to: ConnId, code: CloseCode, reason: &str);
}

/// What a state delivered with [`Outbox::deliver_state`] is the state of:
/// `stream` is one subscription of one connection (the domain numbers
/// them), `item` the thing within it whose latest state counts (a candle's
/// open time). Held states go out in `item` order within a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StateKey {
    pub stream: u64,
    pub item: i64,
}

/// What became of a state handed to [`Outbox::deliver_state`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateDelivery {
    /// In the queue, like any delivery (or the recipient is gone or
    /// closing: nothing to hold).
    Queued,
    /// Held until the queue has room.
    Held,
    /// Held in place of an older state with the same key (conflated).
    Replaced,
    /// Held, but the stream already held `--max-pending-states` keys: the
    /// oldest one, `item`, was given up to make room. The domain must
    /// tell the client.
    Evicted { item: i64 },
}

/// Milliseconds since the Unix epoch, for message timestamps.
pub fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[derive(Debug)]
struct Client {
    info: ConnInfo,
    /// Tells this connection from a later one with the same id.
    serial: u64,
    /// Internal listener, or a publisher key was presented.
    trusted: bool,
    auth_failures: u32,
}

/// Application counters, for logs and metrics.
#[derive(Debug, Default, Clone, Copy)]
pub struct AppStats {
    pub requests: u64,
    pub request_errors: u64,
    pub auth_failures: u64,
    pub published: u64,
    /// Tokens taken, in handshakes and `auth` requests.
    pub tokens_accepted: u64,
    /// Tokens refused (or missing under `--require-token`), by
    /// [`RefusalKind`] in the order of [`RefusalKind::ALL`].
    pub token_refusals: [u64; RefusalKind::ALL.len()],
    /// SIGHUP re-reads of the token keys that worked, and that failed
    /// (the previous keys stay).
    pub token_key_reloads: u64,
    pub token_key_reload_failures: u64,
}

/// The application: one value, owned by the event loop.
#[derive(Debug)]
pub struct App {
    node: Node,
    /// Where channel messages, definitions and chat coordination go:
    /// nowhere else on a single node, through Redis with `--redis`.
    bus: Bus,
}

/// Everything this node holds: its clients and every domain's state.
#[derive(Debug)]
struct Node {
    keys: KeyRing,
    /// Token keys and rules; `token_files` are re-read on SIGHUP.
    tokens: TokenVerifier,
    token_files: KeyFiles,
    /// `--require-token`: public listeners refuse handshakes without one.
    require_token: bool,
    /// Each connection's token grant and its expiry timer.
    grants: Grants,
    max_auth_failures: u32,
    clients: HashMap<ConnId, Client>,
    next_serial: u64,
    channels: Channels,
    chat: Chat,
    streams: EventStreams,
    market: Market,
    /// Where alert firings (and chosen channels) go outside.
    sinks: Sinks,
    stats: AppStats,
}

impl App {
    /// Fails on settings only the app can check (a K-line interval, the
    /// replay file).
    pub fn new(config: &Config, now: Instant) -> Result<Self, String> {
        let token_files = config.token_keys();
        let node = Node {
            keys: KeyRing::new(config.publisher_key_hashes.clone()),
            tokens: TokenVerifier::new(TokenKeys::load(&token_files)?, config.token_rules()),
            token_files,
            require_token: config.require_token,
            grants: Grants::default(),
            max_auth_failures: config.max_auth_failures,
            clients: HashMap::new(),
            next_serial: 0,
            channels: Channels::new(ChannelLimits {
                backlog: config.channel_backlog,
                backlog_age: config.channel_backlog_age,
                max_channels: config.max_channels,
                max_subscriptions: config.max_subscriptions,
            }),
            chat: Chat::new(
                config.chat_history,
                config.chat_max_line,
                config.max_channels,
            ),
            streams: EventStreams::new(config.max_queue_size, config.registration_timeout),
            market: Market::new(config, now)?,
            sinks: Sinks::start(&config.sinks)
                .map_err(|e| format!("cannot start a sink's worker thread: {e}"))?,
            stats: AppStats::default(),
        };
        Ok(Self {
            node,
            bus: Bus::Local,
        })
    }

    /// Whether a handshake on a `role` listener that presents `token` (or
    /// none) may go on, and with what grant. The refusal is the 401's
    /// reason; it is counted by kind in `/metrics`.
    pub fn admit(&mut self, role: Role, token: Option<&str>) -> Result<Option<Grant>, String> {
        let node = &mut self.node;
        let Some(token) = token else {
            if node.require_token && role == Role::Public {
                node.count_refusal(RefusalKind::Missing);
                return Err(
                    "a token is required: send `Authorization: Bearer <JWT>`, or `?token=<JWT>` \
                     in the URL"
                        .to_owned(),
                );
            }
            return Ok(None);
        };
        match node.tokens.verify(token) {
            Ok(grant) => {
                node.stats.tokens_accepted += 1;
                Ok(Some(grant))
            }
            Err(refusal) => {
                node.count_refusal(refusal.kind);
                Err(format!("token refused: {}", refusal.message))
            }
        }
    }

    /// A handshake whose token was not in a usable form (another scheme
    /// than Bearer, two tokens, an empty one): counted as malformed.
    pub fn count_token_form_refusal(&mut self) {
        self.node.count_refusal(RefusalKind::Malformed);
    }

    /// SIGHUP: reads the token keys again. `Ok(false)` when none are
    /// configured; on an error the previous keys stay.
    pub fn reload_tokens(&mut self) -> Result<bool, String> {
        let node = &mut self.node;
        if node.token_files.is_empty() {
            return Ok(false);
        }
        match TokenKeys::load(&node.token_files) {
            Ok(keys) => {
                node.tokens.keys = keys;
                node.stats.token_key_reloads += 1;
                Ok(true)
            }
            Err(e) => {
                node.stats.token_key_reload_failures += 1;
                Err(e)
            }
        }
    }

    /// A WebSocket handshake on `endpoint` completed, with the grant of the
    /// token it presented, if any ([`App::admit`]).
    pub fn on_open(
        &mut self,
        conn: ConnId,
        endpoint: Endpoint,
        info: ConnInfo,
        grant: Option<Grant>,
        now: Instant,
        out: &mut impl Outbox,
    ) {
        let node = &mut self.node;
        node.next_serial += 1;
        if let Some(grant) = grant {
            match &grant.sub {
                // /echo keeps nothing but the grant (its `on_close` forgets
                // only that).
                Some(sub) if endpoint != Endpoint::Echo => node.chat.set_identity(conn, sub),
                _ => {}
            }
            // Even /echo keeps the grant: its token expires like any other.
            node.grants.insert(conn, grant, now);
        }
        if endpoint == Endpoint::Echo {
            // Echo needs no other per-connection state: idle echo
            // connections (what benchmarks hold open by the thousand) cost
            // the app nothing.
            return;
        }
        let trusted = info.role == Role::Internal;
        node.clients.insert(
            conn,
            Client {
                info,
                serial: node.next_serial,
                trusted,
                auth_failures: 0,
            },
        );
        match endpoint {
            Endpoint::Echo | Endpoint::Kline => {}
            Endpoint::Chat => node.chat.on_plain_open(conn, out),
            Endpoint::Ws => node.streams.on_open(conn, node.next_serial, now, out),
        }
        self.flush_chat(out);
    }

    pub fn on_message(
        &mut self,
        conn: ConnId,
        endpoint: Endpoint,
        message: Message<'_>,
        now: Instant,
        out: &mut impl Outbox,
    ) {
        let node = &mut self.node;
        match endpoint {
            // Never called for it: the server sends a reflecting
            // endpoint's messages straight back (see `Intake::Reflect`).
            Endpoint::Echo => debug_assert!(false, "/echo's messages are not the app's"),
            Endpoint::Chat => node.chat.on_plain_message(conn, message, out),
            Endpoint::Ws => node.on_ws_message(&mut self.bus, conn, message, now, out),
            Endpoint::Kline => node.on_kline_message(conn, message, out),
        }
        self.flush_chat(out);
    }

    /// The connection's queue emptied after fan-out messages were dropped.
    pub fn on_drained(&mut self, conn: ConnId, out: &mut impl Outbox) {
        let node = &mut self.node;
        node.market.on_drained(conn, out);
        node.channels.on_drained(conn, out);
        node.chat.on_drained(conn, out);
    }

    /// The connection is gone; forget everything about it.
    pub fn on_close(&mut self, conn: ConnId, endpoint: Endpoint, out: &mut impl Outbox) {
        let node = &mut self.node;
        node.grants.remove(conn);
        if endpoint == Endpoint::Echo {
            return;
        }
        node.clients.remove(&conn);
        node.channels.remove_conn(conn);
        node.chat.remove_conn(conn, out);
        node.streams.remove_conn(conn);
        node.market.remove_conn(conn);
        self.flush_chat(out);
    }

    /// The next moment the app needs [`App::on_timer`].
    pub fn next_deadline(&self) -> Option<Instant> {
        let node = &self.node;
        [
            node.streams.next_deadline(),
            node.market.next_deadline(),
            node.grants.next_deadline(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    pub fn on_timer(&mut self, now: Instant, out: &mut impl Outbox) {
        let node = &mut self.node;
        node.streams.on_timer(now, out);
        node.grants.on_timer(now, out);
        for event in node.market.poll_feeds(now) {
            // Feed events are the server's own: publishing them cannot be
            // refused for trust, only for limits, which are logged.
            if let Err(e) = node.publish_event(&mut self.bus, event, now, out) {
                log::debug!("feed event not published: {}", e.message);
            }
        }
        node.market.on_timer(now, out);
    }

    /// Scale-out: the link was attached; from now on publishes, events and
    /// chat lines go through Redis.
    pub fn attach_cluster(&mut self, link: RedisLink) {
        self.attach_transport(Box::new(link));
    }

    /// [`App::attach_cluster`] over any [`Transport`] (unit tests attach
    /// a fake one).
    fn attach_transport(&mut self, link: Box<dyn Transport>) {
        let tag = crate::cluster::protocol::random_u64() & 0xffff;
        self.node.chat.enable_scale_out(format!("{tag:04x}"));
        self.bus = Bus::Redis(Box::new(RedisBus::new(link)));
    }

    /// None without a cluster; else whether its link is up and what came
    /// with it is applied (`/readyz`).
    pub fn cluster_ready(&self) -> Option<bool> {
        self.bus.redis().map(RedisBus::is_ready)
    }

    /// Everything the Redis link handed over: call on each wake.
    pub fn on_cluster(&mut self, now: Instant, out: &mut impl Outbox) {
        let Bus::Redis(redis) = &mut self.bus else {
            return;
        };
        for item in redis.link().drain() {
            self.node.on_inbound(redis, item, now, out);
        }
        self.node.flush_chat(redis, out);
    }

    /// Sends the chat lines and presence changes collected since the last
    /// call through Redis (a single node's chat collects none).
    fn flush_chat(&mut self, out: &mut impl Outbox) {
        if let Bus::Redis(redis) = &mut self.bus {
            self.node.flush_chat(redis, out);
        }
    }
}

impl Node {
    /// Internal listener, a publisher key, or a publisher's token (for as
    /// long as it has not expired).
    fn is_trusted(&self, conn: ConnId) -> bool {
        self.clients.get(&conn).is_some_and(|c| c.trusted) || self.grants.is_publisher(conn)
    }

    fn count_refusal(&mut self, kind: RefusalKind) {
        if let Some(i) = RefusalKind::ALL.iter().position(|k| *k == kind) {
            self.stats.token_refusals[i] += 1;
        }
    }

    /// Counts a refused token and says why, for an `auth` error.
    fn token_refused(&mut self, refusal: Refusal) -> String {
        self.count_refusal(refusal.kind);
        format!("token refused: {}", refusal.message)
    }

    fn reply_to(&self, conn: ConnId, id: Option<Value>) -> Option<Reply> {
        self.clients.get(&conn).map(|c| Reply {
            conn,
            serial: c.serial,
            id,
        })
    }

    /// Whether the connection waiting for an answer is still the one that
    /// asked (ids are reused; serials are not).
    fn still_open(&self, reply: &Reply) -> bool {
        self.clients
            .get(&reply.conn)
            .is_some_and(|c| c.serial == reply.serial)
    }

    fn send_error(
        &mut self,
        conn: ConnId,
        id: &Option<Value>,
        e: &ProtocolError,
        out: &mut impl Outbox,
    ) {
        self.stats.request_errors += 1;
        out.reply(conn, Message::Text(&error(id, e)));
    }
}

#[cfg(test)]
pub(crate) mod tests;
