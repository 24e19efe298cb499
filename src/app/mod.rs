//! What each endpoint does with messages. Nothing here knows about
//! sockets: the server hands the app (connection, message) pairs and an
//! [`Outbox`] to answer through, addressed by connection id. A message for
//! many recipients is encoded once as a [`SharedFrame`] and handed to each.

mod auth;
pub mod channels;
pub mod chat;
mod echo;
pub mod events;
pub mod market;
pub mod protocol;
pub mod routes;
pub mod scale_out;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use log::{debug, info, warn};
use serde_json::{json, Map, Value};

use self::auth::KeyRing;
use self::channels::definition::ChannelDefinition;
use self::channels::{Apply, ChannelLimits, Channels, Published, SettingsSource};
use self::chat::nicks::{ClaimOutcome, ClaimState, NickChange, PendingClaim};
use self::chat::presence::{who_line, JoinRequest, PresenceRelay};
use self::chat::{Chat, LineKind};
use self::events::stream::{EventStreams, StreamEvent};
use self::market::kline_text::{self, TextCommand};
use self::market::Market;
use self::protocol::{
    ack, error, parse_request, ChannelSettings, Command, ErrorCode, ProtocolError, Request,
};
use self::scale_out::{JoinWaiting, Reply, Resume, ScaleOut, WhoWaiting, CHAT_PREFIX};
use crate::cluster::{Inbound, RedisLink, MAX_HISTORY};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::ws::CloseCode;
pub use crate::ws::SharedFrame;
pub use routes::{resolve, Endpoint, Target};

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
    /// [`App::on_drained`] once that queue has emptied.
    fn deliver(&mut self, to: ConnId, frame: &SharedFrame) -> bool;

    /// Closes a connection with a close frame.
    fn close(&mut self, to: ConnId, code: CloseCode, reason: &str);
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
}

/// The application: one value, owned by the event loop.
#[derive(Debug)]
pub struct App {
    keys: KeyRing,
    max_auth_failures: u32,
    clients: HashMap<ConnId, Client>,
    next_serial: u64,
    channels: Channels,
    chat: Chat,
    streams: EventStreams,
    market: Market,
    /// Scale-out over Redis (`--redis`), when on.
    cluster: Option<ScaleOut>,
    pub stats: AppStats,
}

impl App {
    /// Fails on settings only the app can check (a K-line interval, the
    /// replay file).
    pub fn new(config: &Config, now: Instant) -> Result<Self, String> {
        Ok(Self {
            keys: KeyRing::new(config.publisher_key_hashes.clone()),
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
            cluster: None,
            stats: AppStats::default(),
        })
    }

    /// A WebSocket handshake on `endpoint` completed.
    pub fn on_open(
        &mut self,
        conn: ConnId,
        endpoint: Endpoint,
        info: ConnInfo,
        now: Instant,
        out: &mut impl Outbox,
    ) {
        self.next_serial += 1;
        if endpoint == Endpoint::Echo {
            // Echo needs no per-connection state: idle echo connections
            // (what benchmarks hold open by the thousand) cost the app nothing.
            return;
        }
        let trusted = info.role == Role::Internal;
        self.clients.insert(
            conn,
            Client {
                info,
                serial: self.next_serial,
                trusted,
                auth_failures: 0,
            },
        );
        match endpoint {
            Endpoint::Echo | Endpoint::Kline => {}
            Endpoint::Chat => self.chat.on_plain_open(conn, out),
            Endpoint::Ws => self.streams.on_open(conn, self.next_serial, now, out),
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
        match endpoint {
            Endpoint::Echo => echo::on_message(conn, message, out),
            Endpoint::Chat => self.chat.on_plain_message(conn, message, out),
            Endpoint::Ws => self.on_ws_message(conn, message, now, out),
            Endpoint::Kline => self.on_kline_message(conn, message, out),
        }
        self.flush_chat(out);
    }

    fn on_ws_message(
        &mut self,
        conn: ConnId,
        message: Message<'_>,
        now: Instant,
        out: &mut impl Outbox,
    ) {
        self.stats.requests += 1;
        let Message::Text(text) = message else {
            let e = ProtocolError::new(
                ErrorCode::BadRequest,
                "binary messages are not understood on /ws: send JSON text",
            );
            return self.send_error(conn, &None, &e, out);
        };
        if let Some(command) = kline_text::parse(text) {
            self.streams.on_other_request(conn);
            return self.kline_text_command(conn, command, out);
        }
        match parse_request(text) {
            Ok(request) => {
                if !matches!(request.command, Command::Register { .. }) {
                    self.streams.on_other_request(conn);
                }
                let id = request.id.clone();
                if let Err(e) = self.handle(conn, request, now, out) {
                    self.send_error(conn, &id, &e, out);
                }
            }
            Err((id, e)) => self.send_error(conn, &id, &e, out),
        }
    }

    /// `/kline`: only the old K-line service's plain-text commands.
    fn on_kline_message(&mut self, conn: ConnId, message: Message<'_>, out: &mut impl Outbox) {
        match message {
            Message::Text(text) => match kline_text::parse(text) {
                Some(command) => self.kline_text_command(conn, command, out),
                None => {
                    let e = ProtocolError::new(
                        ErrorCode::UnknownType,
                        format!("unknown command `{}` (expected sub-1s, sub-1m, sub-5m, sub-1h or unsub)", text.trim()),
                    );
                    self.send_error(conn, &None, &e, out);
                }
            },
            Message::Binary(_) => {
                let e =
                    ProtocolError::new(ErrorCode::BadRequest, "send text commands such as sub-1m");
                self.send_error(conn, &None, &e, out);
            }
        }
    }

    fn kline_text_command(
        &mut self,
        conn: ConnId,
        command: TextCommand<'_>,
        out: &mut impl Outbox,
    ) {
        match command {
            TextCommand::Subscribe(interval) => {
                self.market.kline_text_subscribe(conn, interval, out)
            }
            TextCommand::Unsubscribe => self.market.kline_text_unsubscribe(conn),
        }
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

    fn handle<O: Outbox>(
        &mut self,
        conn: ConnId,
        request: Request,
        now: Instant,
        out: &mut O,
    ) -> Result<(), ProtocolError> {
        let Request { id, command } = request;
        let acknowledge = |out: &mut O, request: &str, extra: Value| {
            out.reply(conn, Message::Text(&ack(&id, request, extra)))
        };
        match command {
            Command::Register { filters } => {
                self.streams.register(conn, filters, out);
            }
            Command::Auth { key } => self.authenticate(conn, &key, &id, out)?,
            Command::Create { channel, settings } if self.cluster.is_some() => {
                self.require_trusted(conn, "create channels")?;
                let reply = self.reply_to(conn, id.clone());
                if let Some(extra) = self.create_in_cluster(&channel, &settings, reply)? {
                    acknowledge(out, "create", extra);
                }
            }
            Command::Create { channel, settings } => {
                self.require_trusted(conn, "create channels")?;
                let extra = self.channels.create(&channel, &settings)?;
                acknowledge(out, "create", extra);
            }
            Command::Publish { channel, data } if self.cluster.is_some() => {
                let trusted = self.clients.get(&conn).is_some_and(|c| c.trusted);
                if channel == EVENTS_CHANNEL {
                    event_fields(&data)?;
                    if !trusted {
                        return Err(untrusted_event_publisher());
                    }
                }
                self.channels.authorize(&channel, trusted)?;
                self.stats.published += 1;
                let reply = self.reply_to(conn, id);
                self.relay(&channel, data, reply, now, out);
            }
            Command::Subscribe {
                channel,
                since: Some(since),
            } if self.cluster.is_some()
                && !self.channels.can_replay_locally(&channel, since, now) =>
            {
                self.channels.check_subscribe(conn, &channel, Some(since))?;
                let cluster = self.cluster.as_mut().expect("checked above");
                let request = cluster
                    .link
                    .history(&channel, since, MAX_HISTORY)
                    .map_err(|e| unavailable(format!("cannot read the channel's history: {e}")))?;
                let Some(reply) = self.reply_to(conn, id) else {
                    return Ok(());
                };
                let cluster = self.cluster.as_mut().expect("checked above");
                cluster.resumes.insert(
                    request,
                    Resume {
                        reply,
                        channel,
                        since,
                    },
                );
            }
            Command::Publish { channel, data } => {
                let trusted = self.clients.get(&conn).is_some_and(|c| c.trusted);
                let published = if channel == EVENTS_CHANNEL {
                    let fields = event_fields(&data)?;
                    if !trusted {
                        return Err(untrusted_event_publisher());
                    }
                    self.publish_event(fields, now, out)?
                } else {
                    self.channels.publish(&channel, &data, trusted, now, out)?
                };
                self.stats.published += 1;
                let extra = json!({ "channel": channel, "offset": published.offset, "delivered": published.delivered });
                acknowledge(out, "publish", extra);
            }
            Command::Subscribe { channel, since } => {
                let (extra, replay) = self.channels.subscribe(conn, &channel, since, now)?;
                acknowledge(out, "subscribe", extra);
                for frame in &replay {
                    out.reply_shared(conn, frame);
                }
            }
            Command::Unsubscribe { channel } => {
                let extra = self.channels.unsubscribe(conn, &channel)?;
                acknowledge(out, "unsubscribe", extra);
            }
            Command::ListChannels => acknowledge(out, "list", self.channels.list()),
            Command::ChatJoin { room } if self.cluster.is_some() => {
                self.chat.begin_join(conn, &room, id.clone(), out)?;
            }
            Command::ChatJoin { room } => {
                self.chat
                    .join(conn, &room, out, |info| ack(&id, "chat.join", info.clone()))?;
            }
            Command::ChatLeave { room } => {
                if !self.chat.leave(conn, &room, out) {
                    return Err(ProtocolError::new(
                        ErrorCode::NotFound,
                        format!("not in room `{room}`"),
                    ));
                }
                acknowledge(out, "chat.leave", json!({ "room": room }));
            }
            Command::ChatSay { room, text } => {
                self.chat.say(conn, &room, &text, LineKind::Say, out)?;
                acknowledge(out, "chat.say", json!({ "room": room }));
            }
            Command::ChatNick { nick } if self.cluster.is_some() => {
                let Some(reply) = self.reply_to(conn, id.clone()) else {
                    return Ok(());
                };
                if let Some(extra) = self.claim_nick(conn, &nick, reply, false, out)? {
                    acknowledge(out, "chat.nick", extra);
                }
            }
            Command::ChatNick { nick } => {
                let extra = self.chat.rename(conn, &nick, out)?;
                acknowledge(out, "chat.nick", extra);
            }
            Command::ChatWho { room } if self.cluster.is_some() => {
                // No room can have such a name: not worth asking Redis.
                if !chat::command::valid_room(&room) {
                    return Err(ProtocolError::new(
                        ErrorCode::NotFound,
                        format!("no room named `{room}`"),
                    ));
                }
                let reply = self.reply_to(conn, id.clone());
                let cluster = self.cluster.as_mut().expect("checked above");
                match (cluster.link.who(&room), reply) {
                    (Ok(request), Some(reply)) => {
                        let plain = false;
                        cluster
                            .whos
                            .insert(request, WhoWaiting { reply, room, plain });
                    }
                    (Ok(_), None) => {}
                    (Err(_), _) => {
                        let members = self.chat.who(&room);
                        let extra = self.who_answer(&room, members, true)?;
                        acknowledge(out, "chat.who", extra);
                    }
                }
            }
            Command::ChatWho { room } => {
                if !self.chat.room_exists(&room) {
                    return Err(ProtocolError::new(
                        ErrorCode::NotFound,
                        format!("no room named `{room}`"),
                    ));
                }
                let members = self.chat.who(&room);
                acknowledge(out, "chat.who", json!({ "room": room, "members": members }));
            }
            Command::ChatRooms if self.cluster.is_some() => {
                let Some(reply) = self.reply_to(conn, id.clone()) else {
                    return Ok(());
                };
                self.ask_rooms(reply, false, out);
            }
            Command::ChatRooms => acknowledge(out, "chat.rooms", self.chat.rooms()),
            Command::KlineSubscribe(request) => {
                self.market
                    .kline_subscribe(conn, &request, out, |details| {
                        ack(&id, "kline.subscribe", details)
                    })?;
            }
            Command::KlineUnsubscribe { symbol, interval } => {
                let extra = self.market.kline_unsubscribe(conn, &symbol, &interval)?;
                acknowledge(out, "kline.unsubscribe", extra);
            }
            Command::MarketSymbols => acknowledge(out, "market.symbols", self.market.symbols()),
            Command::FilterSubscribe { name, filter } => {
                let extra = self.market.filter_subscribe(conn, &name, &filter)?;
                acknowledge(out, "filter.subscribe", extra);
            }
            Command::FilterUnsubscribe { name } => {
                let extra = self.market.filter_unsubscribe(conn, &name)?;
                acknowledge(out, "filter.unsubscribe", extra);
            }
            Command::AlertCreate { request } => {
                let extra = self.market.alert_create(conn, &request)?;
                acknowledge(out, "alert.create", extra);
            }
            Command::AlertList => acknowledge(out, "alert.list", self.market.alert_list(conn)),
            Command::AlertDelete { alert } => {
                let extra = self.market.alert_delete(conn, &alert)?;
                acknowledge(out, "alert.delete", extra);
            }
        }
        Ok(())
    }

    fn require_trusted(&self, conn: ConnId, action: &str) -> Result<(), ProtocolError> {
        if self.clients.get(&conn).is_some_and(|c| c.trusted) {
            Ok(())
        } else {
            Err(ProtocolError::new(
                ErrorCode::Forbidden,
                format!("only trusted connections may {action}: use the internal listener, or `auth` with a publisher key"),
            ))
        }
    }

    fn authenticate(
        &mut self,
        conn: ConnId,
        key: &str,
        id: &Option<Value>,
        out: &mut impl Outbox,
    ) -> Result<(), ProtocolError> {
        let Some(client) = self.clients.get_mut(&conn) else {
            return Ok(());
        };
        if self.keys.is_empty() {
            return Err(ProtocolError::new(
                ErrorCode::AuthFailed,
                "this server accepts no publisher keys; publish from the internal listener",
            ));
        }
        if self.keys.verify(key) {
            client.trusted = true;
            client.auth_failures = 0;
            out.reply(
                conn,
                Message::Text(&ack(id, "auth", json!({ "trusted": true }))),
            );
            return Ok(());
        }
        client.auth_failures += 1;
        self.stats.auth_failures += 1;
        warn!(
            "conn {conn} from {}: publisher key rejected ({} failure(s))",
            client.info.peer, client.auth_failures
        );
        if client.auth_failures >= self.max_auth_failures {
            let e = ProtocolError::new(
                ErrorCode::AuthFailed,
                "publisher key rejected; too many failures, closing",
            );
            out.reply(conn, Message::Text(&error(id, &e)));
            out.close(
                conn,
                CloseCode::POLICY_VIOLATION,
                "too many failed authentication attempts",
            );
            return Ok(());
        }
        let left = self.max_auth_failures - client.auth_failures;
        Err(ProtocolError::new(
            ErrorCode::AuthFailed,
            format!("publisher key rejected; {left} attempt(s) left"),
        ))
    }

    /// The connection's queue emptied after fan-out messages were dropped.
    pub fn on_drained(&mut self, conn: ConnId, out: &mut impl Outbox) {
        self.market.on_drained(conn, out);
        self.channels.on_drained(conn, out);
        self.chat.on_drained(conn, out);
    }

    /// The connection is gone; forget everything about it.
    pub fn on_close(&mut self, conn: ConnId, endpoint: Endpoint, out: &mut impl Outbox) {
        if endpoint == Endpoint::Echo {
            return;
        }
        self.clients.remove(&conn);
        self.channels.remove_conn(conn);
        self.chat.remove_conn(conn, out);
        self.streams.remove_conn(conn);
        self.market.remove_conn(conn);
        self.flush_chat(out);
    }

    /// The app's counters for `GET /metrics`.
    pub fn write_metrics(&self, m: &mut Metrics) {
        let s = &self.stats;
        m.counter(
            "fanout_requests_total",
            "JSON requests received on /ws.",
            s.requests,
        );
        m.counter(
            "fanout_request_errors_total",
            "Requests answered with an error.",
            s.request_errors,
        );
        m.counter(
            "fanout_auth_failures_total",
            "Publisher keys rejected.",
            s.auth_failures,
        );
        m.counter(
            "fanout_published_total",
            "Messages published by clients.",
            s.published,
        );
        m.family(
            "fanout_slow_consumer_drops_total",
            "Fan-out messages dropped because a subscriber's queue was full, by stream.",
            "counter",
            &[
                (&[("stream", "channel")], self.channels.dropped_total as f64),
                (&[("stream", "chat")], self.chat.dropped_total as f64),
                (
                    &[("stream", "market")],
                    self.market.stats.dropped_updates as f64,
                ),
            ],
        );
        m.counter(
            "fanout_slow_consumer_closes_total",
            "Registered event-stream clients closed with 1008 for reading too slowly.",
            self.streams.slow_closes,
        );
        m.counter(
            "fanout_registration_timeouts_total",
            "Clients closed for not registering in time.",
            self.streams.timeouts,
        );
        let market = &self.market.stats;
        m.counter(
            "fanout_market_trades_total",
            "Trades and ticks aggregated into candles.",
            market.trades,
        );
        m.counter(
            "fanout_market_late_trades_total",
            "Trades for already-closed candles, dropped.",
            market.late_trades,
        );
        m.counter(
            "fanout_market_rejected_events_total",
            "Market events with unusable fields, or past the symbol limit.",
            market.rejected_market_events,
        );
        m.counter(
            "fanout_alerts_fired_total",
            "Alerts fired.",
            market.alerts_fired,
        );
        self.write_cluster_metrics(m);
    }

    /// The next moment the app needs [`App::on_timer`].
    pub fn next_deadline(&self) -> Option<Instant> {
        [self.streams.next_deadline(), self.market.next_deadline()]
            .into_iter()
            .flatten()
            .min()
    }

    pub fn on_timer(&mut self, now: Instant, out: &mut impl Outbox) {
        self.streams.on_timer(now, out);
        for event in self.market.poll_feeds(now) {
            // Feed events are the server's own: publishing them cannot be
            // refused for trust, only for limits, which are logged.
            if let Err(e) = self.publish_event(event, now, out) {
                debug!("feed event not published: {}", e.message);
            }
        }
        self.market.on_timer(now, out);
    }

    /// The one path every event takes, whoever published it: the `events`
    /// channel (offsets, backlog, subscribers), the registration streams,
    /// and the market (candles, filters, alerts, whose firings go to their
    /// owners and to the `alerts` channel). With a cluster, through Redis
    /// first (see [`scale_out`]).
    fn publish_event(
        &mut self,
        fields: Map<String, Value>,
        now: Instant,
        out: &mut impl Outbox,
    ) -> Result<Published, ProtocolError> {
        if self.cluster.is_some() {
            self.channels.authorize(EVENTS_CHANNEL, true)?;
            self.relay(EVENTS_CHANNEL, Value::Object(fields), None, now, out);
            return Ok(Published {
                offset: 0,
                delivered: 0,
                dropped: 0,
            });
        }
        let data = Value::Object(fields);
        let published = self
            .channels
            .publish(EVENTS_CHANNEL, &data, true, now, out)?;
        self.event_effects(data, unix_millis(), now, out);
        Ok(published)
    }

    /// What an event does besides being a channel message.
    fn event_effects(&mut self, data: Value, ts: u64, now: Instant, out: &mut impl Outbox) {
        let Value::Object(fields) = data else {
            return;
        };
        let event = StreamEvent::new(fields);
        self.streams.publish(&event, out);
        let json =
            std::str::from_utf8(event.frame.payload()).expect("events are encoded from JSON text");
        for fired in self
            .market
            .on_event_at(&event.fields, json, now, ts as i64, out)
        {
            out.reply(fired.conn, Message::Text(&fired.message.to_string()));
            let published = if self.cluster.is_some() {
                self.channels.authorize(ALERTS_CHANNEL, true).map(|()| {
                    self.relay(ALERTS_CHANNEL, fired.message, None, now, out);
                })
            } else {
                self.channels
                    .publish(ALERTS_CHANNEL, &fired.message, true, now, out)
                    .map(|_| ())
            };
            if let Err(e) = published {
                debug!("alert not published on `{ALERTS_CHANNEL}`: {}", e.message);
            }
        }
    }

    /// Applies a channel message (any channel, `events` included) with an
    /// offset decided already, or none (local delivery).
    #[allow(clippy::too_many_arguments)]
    fn apply_message(
        &mut self,
        channel: &str,
        offset: Option<u64>,
        ts: u64,
        data: Value,
        mode: Apply,
        now: Instant,
        out: &mut impl Outbox,
    ) -> Result<Published, ProtocolError> {
        let published = self
            .channels
            .apply(channel, offset, ts, &data, now, mode, out)?;
        if channel == EVENTS_CHANNEL && mode == Apply::Deliver {
            self.event_effects(data, ts, now, out);
        }
        Ok(published)
    }

    /// Scale-out: the link was attached; from now on publishes, events and
    /// chat lines go through Redis.
    pub fn attach_cluster(&mut self, link: RedisLink) {
        let tag = crate::cluster::protocol::random_u64() & 0xffff;
        self.chat.guest_tag = Some(format!("{tag:04x}"));
        self.chat.relay = Some(Vec::new());
        self.chat.presence = Some(PresenceRelay::default());
        self.cluster = Some(ScaleOut::new(link));
    }

    /// None without a cluster; else whether its link is up and what came
    /// with it is applied (`/readyz`).
    pub fn cluster_ready(&self) -> Option<bool> {
        self.cluster.as_ref().map(ScaleOut::is_ready)
    }

    fn reply_to(&self, conn: ConnId, id: Option<Value>) -> Option<Reply> {
        self.clients.get(&conn).map(|c| Reply {
            conn,
            serial: c.serial,
            id,
        })
    }

    fn still_open(&self, reply: &Reply) -> bool {
        self.clients
            .get(&reply.conn)
            .is_some_and(|c| c.serial == reply.serial)
    }

    /// Scale-out `chat.who`: the members on every node (`local`: this
    /// node's only, Redis could not answer).
    fn who_answer(
        &self,
        room: &str,
        members: Vec<String>,
        local: bool,
    ) -> Result<Value, ProtocolError> {
        if members.is_empty() && !self.chat.room_exists(room) {
            return Err(ProtocolError::new(
                ErrorCode::NotFound,
                format!("no room named `{room}`"),
            ));
        }
        let mut extra = json!({ "room": room, "members": members });
        if local {
            extra["local"] = json!(true);
        }
        Ok(extra)
    }

    /// Answers a `who` that waited for Redis.
    fn answer_who(
        &mut self,
        waiting: WhoWaiting,
        result: Result<Vec<String>, String>,
        out: &mut impl Outbox,
    ) {
        if !self.still_open(&waiting.reply) {
            return;
        }
        let (members, local) = match result {
            Ok(nicks) => (nicks, false),
            Err(e) => {
                debug!("who [{}] answered from this node only: {e}", waiting.room);
                (self.chat.who(&waiting.room), true)
            }
        };
        let Reply { conn, id, .. } = waiting.reply;
        if waiting.plain {
            out.reply(
                conn,
                Message::Text(&who_line(&waiting.room, &members, local)),
            );
            return;
        }
        match self.who_answer(&waiting.room, members, local) {
            Ok(extra) => out.reply(conn, Message::Text(&ack(&id, "chat.who", extra))),
            Err(e) => self.send_error(conn, &id, &e, out),
        }
    }

    /// Scale-out nick change: reserved in Redis, and answered when Redis
    /// decided (answers None). While the link is not up this node decides
    /// alone and answers at once (`"local": true`); the claim waits for
    /// Redis, which may later rename the member (see [`chat::nicks`]).
    fn claim_nick(
        &mut self,
        conn: ConnId,
        nick: &str,
        reply: Reply,
        plain: bool,
        out: &mut impl Outbox,
    ) -> Result<Option<Value>, ProtocolError> {
        self.chat.check_rename(conn, nick)?;
        let asking = |c: &PendingClaim| {
            c.reply.conn == conn
                && c.reply.serial == reply.serial
                && matches!(c.state, ClaimState::Asked { .. })
        };
        let cluster = self.cluster.as_ref().expect("called with a cluster");
        if cluster.nick_claims.values().any(asking) {
            return Err(ProtocolError::new(
                ErrorCode::Conflict,
                "a nick change of yours is already waiting for redis: try again when it is answered",
            ));
        }
        // A new member's guest nick is claimed before the nick it asks for.
        self.flush_presence(out);
        let previous = self.chat.nick_of(conn).map(str::to_owned);
        let cluster = self.cluster.as_mut().expect("called with a cluster");
        let up = cluster.is_up();
        let nick_owned = nick.to_owned();
        // A claim the link cannot queue is counted there; the nick is then
        // this node's word alone until the next reconnect claims it again.
        if let Ok(request) = cluster
            .link
            .claim_nick(conn as u64, nick, previous.as_deref())
        {
            let state = if up {
                ClaimState::Asked { plain }
            } else {
                ClaimState::Held
            };
            let claim = PendingClaim {
                reply,
                nick: nick_owned,
                state,
            };
            cluster.nick_claims.insert(request, claim);
            if up {
                return Ok(None);
            }
        }
        let extra = self.chat.apply_rename(conn, nick, out);
        Ok(Some(chat::nicks::mark_local(extra)))
    }

    /// Tells a member who asked for a nick that it is not theirs.
    fn refuse_nick(
        &mut self,
        reply: &Reply,
        plain: bool,
        e: &ProtocolError,
        out: &mut impl Outbox,
    ) {
        if plain {
            out.reply(reply.conn, Message::Text(&format!("! {}", e.message)));
        } else {
            self.send_error(reply.conn, &reply.id, e, out);
        }
    }

    /// Gives a member the nick it asked for and answers it (`local`: this
    /// node decided alone).
    fn grant_nick(
        &mut self,
        reply: &Reply,
        nick: &str,
        plain: bool,
        local: bool,
        out: &mut impl Outbox,
    ) -> Result<(), ProtocolError> {
        self.chat.check_rename(reply.conn, nick)?;
        let extra = self.chat.apply_rename(reply.conn, nick, out);
        match (plain, local) {
            (true, true) => out.reply(
                reply.conn,
                Message::Text(&chat::nicks::local_nick_line(nick)),
            ),
            (true, false) => {}
            (false, local) => {
                let extra = if local {
                    chat::nicks::mark_local(extra)
                } else {
                    extra
                };
                out.reply(
                    reply.conn,
                    Message::Text(&ack(&reply.id, "chat.nick", extra)),
                );
            }
        }
        Ok(())
    }

    /// Redis's answer to a nick claim.
    fn on_nick_answer(
        &mut self,
        request: u64,
        nick: String,
        result: Result<bool, String>,
        out: &mut impl Outbox,
    ) {
        let cluster = self.cluster.as_mut().expect("called with a cluster");
        let Some(claim) = cluster.nick_claims.remove(&request) else {
            return;
        };
        let conn = claim.reply.conn;
        let open = self.still_open(&claim.reply);
        let plain = matches!(claim.state, ClaimState::Asked { plain: true });
        let granted = match result {
            Ok(granted) => granted,
            Err(why) => {
                let cluster = self.cluster.as_mut().expect("called with a cluster");
                cluster.nick_claim_failed(&nick, &why);
                if open && matches!(claim.state, ClaimState::Asked { .. }) {
                    let e = unavailable(format!("cannot reserve nick {nick} now: {why}"));
                    self.refuse_nick(&claim.reply, plain, &e, out);
                }
                return;
            }
        };
        let holds = open && self.chat.nick_of(conn) == Some(nick.as_str());
        match chat::nicks::outcome(&claim.state, granted, open, holds) {
            ClaimOutcome::Settled => {}
            ClaimOutcome::Grant => {
                if let Err(e) = self.grant_nick(&claim.reply, &nick, plain, false, out) {
                    self.refuse_nick(&claim.reply, plain, &e, out);
                    self.release_nick(conn, &nick);
                }
            }
            ClaimOutcome::Refuse => {
                self.refuse_nick(&claim.reply, plain, &chat::nick_taken(&nick), out)
            }
            ClaimOutcome::Release => self.release_nick(conn, &nick),
            ClaimOutcome::Lost => self.rename_lost(claim.reply, &nick, out),
        }
    }

    fn release_nick(&mut self, conn: ConnId, nick: &str) {
        let cluster = self.cluster.as_mut().expect("called with a cluster");
        // Not queued: counted by the link; freed when this node's alive
        // key goes.
        let _ = cluster.link.release_nick(conn as u64, nick);
    }

    /// Another node's member holds the nick this member has: it becomes a
    /// fresh guest, and is told.
    fn rename_lost(&mut self, reply: Reply, lost: &str, out: &mut impl Outbox) {
        let conn = reply.conn;
        let guest = self.chat.fresh_guest();
        self.chat.apply_rename(conn, &guest, out);
        let notice = chat::nicks::lost_nick_notice(lost, &guest, self.chat.is_plain(conn));
        out.reply(conn, Message::Text(&notice));
        let cluster = self.cluster.as_mut().expect("called with a cluster");
        cluster.stats.nick_conflicts += 1;
        info!("nick {lost} of conn {conn} is another node's: renamed {guest}");
        if let Ok(request) = cluster.link.claim_nick(conn as u64, &guest, None) {
            let claim = PendingClaim {
                reply,
                nick: guest,
                state: ClaimState::Held,
            };
            cluster.nick_claims.insert(request, claim);
        }
    }

    /// The link went down: nick changes waiting for Redis are decided here
    /// alone (`"local": true`); their claims stay queued for Redis.
    fn settle_nicks_locally(&mut self, out: &mut impl Outbox) {
        let cluster = self.cluster.as_mut().expect("called with a cluster");
        let asked: Vec<u64> = cluster
            .nick_claims
            .iter()
            .filter(|(_, c)| matches!(c.state, ClaimState::Asked { .. }))
            .map(|(request, _)| *request)
            .collect();
        for request in asked {
            let cluster = self.cluster.as_mut().expect("called with a cluster");
            let Some(claim) = cluster.nick_claims.get_mut(&request) else {
                continue;
            };
            let plain = matches!(claim.state, ClaimState::Asked { plain: true });
            claim.state = ClaimState::Abandoned;
            let (reply, nick) = (claim.reply.clone(), claim.nick.clone());
            if !self.still_open(&reply) {
                continue;
            }
            match self.grant_nick(&reply, &nick, plain, true, out) {
                Ok(()) => {
                    let cluster = self.cluster.as_mut().expect("called with a cluster");
                    if let Some(claim) = cluster.nick_claims.get_mut(&request) {
                        claim.state = ClaimState::Held;
                    }
                }
                Err(e) => self.refuse_nick(&reply, plain, &e, out),
            }
        }
    }

    /// Claims every member's nick here again: after a reconnect (this
    /// node's alive key may have expired, and others may have taken its
    /// nicks) or a data reset. A refusal renames the member.
    fn reassert_nicks(&mut self) {
        let nicks = self.chat.nicks_snapshot();
        for (conn, nick) in nicks {
            self.claim_held_nick(conn, nick);
        }
    }

    /// Claims in Redis a nick the member already holds here (nobody waits
    /// for the answer; a refusal renames the member).
    fn claim_held_nick(&mut self, conn: ConnId, nick: String) {
        let Some(reply) = self.reply_to(conn, None) else {
            return;
        };
        let cluster = self.cluster.as_mut().expect("called with a cluster");
        if let Ok(request) = cluster.link.claim_nick(conn as u64, &nick, None) {
            let claim = PendingClaim {
                reply,
                nick,
                state: ClaimState::Held,
            };
            cluster.nick_claims.insert(request, claim);
        }
    }

    /// Asks Redis for every node's rooms (answered by
    /// [`App::answer_rooms`]); if it cannot be asked, this node's.
    fn ask_rooms(&mut self, reply: Reply, plain: bool, out: &mut impl Outbox) {
        let cluster = self.cluster.as_mut().expect("called with a cluster");
        match cluster.link.rooms() {
            Ok(request) => {
                cluster.rooms_waiting.insert(request, (reply, plain));
            }
            Err(e) => self.answer_rooms(reply, plain, Err(e.to_string()), out),
        }
    }

    fn answer_rooms(
        &mut self,
        reply: Reply,
        plain: bool,
        result: Result<Vec<(String, u64)>, String>,
        out: &mut impl Outbox,
    ) {
        if !self.still_open(&reply) {
            return;
        }
        let (counts, local) = match result {
            Ok(cluster) => (self.chat.merge_room_counts(cluster), false),
            Err(e) => {
                debug!("rooms answered from this node only: {e}");
                (self.chat.room_counts(), true)
            }
        };
        let text = if plain {
            chat::rooms_line(&counts, local)
        } else {
            ack(&reply.id, "chat.rooms", chat::rooms_answer(&counts, local))
        };
        out.reply(reply.conn, Message::Text(&text));
    }

    /// Asks Redis for what a join replays and lists (the room's latest
    /// lines, its members on every node); what cannot be asked is this
    /// node's instead.
    fn ask_for_join(&mut self, join: JoinRequest, out: &mut impl Outbox) {
        let Some(reply) = self.reply_to(join.conn, join.id) else {
            return;
        };
        // Join, leave and nick notices share the room's stream with the
        // lines a join replays: read enough to find them among those.
        let limit = self.chat.history_len().saturating_mul(4) + 16;
        let cluster = self.cluster.as_mut().expect("called with a cluster");
        let key = cluster.next_join;
        cluster.next_join += 1;
        let full = "the redis link's queue is full";
        let channel = format!("{CHAT_PREFIX}{}", join.room);
        let recent = match cluster.link.recent(&channel, limit) {
            Ok(request) => {
                cluster.join_parts.insert(request, key);
                None
            }
            Err(_) => Some(Err(full.to_string())),
        };
        let members = match cluster.link.who(&join.room) {
            Ok(request) => {
                cluster.join_parts.insert(request, key);
                None
            }
            Err(_) => Some(Err(full.to_string())),
        };
        let waiting = JoinWaiting {
            reply,
            room: join.room,
            recent,
            members,
        };
        cluster.joins.insert(key, waiting);
        self.try_finish_join(key, out);
    }

    /// Answers a join once Redis answered both its questions.
    fn try_finish_join(&mut self, key: u64, out: &mut impl Outbox) {
        let cluster = self.cluster.as_mut().expect("called with a cluster");
        let answered = cluster
            .joins
            .get(&key)
            .is_some_and(|j| j.recent.is_some() && j.members.is_some());
        if !answered {
            return;
        }
        let Some(JoinWaiting {
            reply,
            room,
            recent: Some(recent),
            members: Some(members),
        }) = cluster.joins.remove(&key)
        else {
            return;
        };
        if !self.still_open(&reply) {
            return;
        }
        if let Err(e) = recent.as_ref().and(members.as_ref()) {
            debug!("join [{room}] answered from this node only: {e}");
        }
        let Reply { conn, id, .. } = reply;
        self.chat
            .finish_join(conn, &room, recent.ok(), members.ok(), out, |info| {
                ack(&id, "chat.join", info.clone())
            });
    }

    /// Writes every member's presence here to Redis again: after a
    /// reconnect (another node may have cleared it while this node's alive
    /// key had expired) or a data reset.
    fn rewrite_presence(&mut self) {
        let Some(cluster) = self.cluster.as_mut() else {
            return;
        };
        for change in self.chat.presence_snapshot() {
            cluster.presence(&change);
        }
    }

    /// Scale-out `create`: the definition goes through Redis, where the
    /// first one of a channel wins, and its ack waits for the definition in
    /// force (answers None). A channel with the cluster's definition
    /// already, or the link not up: answered at once (the latter with
    /// `"local": true`, and the definition queued for Redis).
    fn create_in_cluster(
        &mut self,
        channel: &str,
        settings: &ChannelSettings,
        reply: Option<Reply>,
    ) -> Result<Option<Value>, ProtocolError> {
        let definition = self.channels.resolve(settings)?;
        self.channels.check_room_for(channel)?;
        let cluster = self.cluster.as_mut().expect("called with a cluster");
        let up = cluster.is_up();
        let answer = |channels: &Channels, created: bool, local: bool| {
            let mut extra = channels.describe(channel).unwrap_or_else(|| json!({}));
            extra["created"] = json!(created);
            if local {
                extra["local"] = json!(true);
            }
            extra
        };
        match self.channels.settings_source(channel) {
            // Redis's definitions never change (until it loses its data).
            Some(SettingsSource::Cluster) => return Ok(Some(answer(&self.channels, false, false))),
            // Made here during this outage; its definition is queued.
            Some(SettingsSource::Local) if !up => {
                return Ok(Some(answer(&self.channels, false, true)))
            }
            _ => {}
        }
        let waiting = if up { reply } else { None };
        cluster
            .define(channel, &definition, !up, waiting)
            .map_err(|e| {
                unavailable(format!(
                    "cannot create the channel on every node now ({e}); try again"
                ))
            })?;
        if up {
            return Ok(None);
        }
        self.channels
            .define(channel, definition, SettingsSource::Local)?;
        Ok(Some(answer(&self.channels, true, true)))
    }

    /// Applies a channel definition from Redis (the cluster's, for every
    /// node); what cannot be applied is counted.
    fn apply_definition(&mut self, channel: &str, text: &str) -> Result<(), ProtocolError> {
        let cluster = self.cluster.as_mut().expect("called with a cluster");
        let definition = match ChannelDefinition::decode(text) {
            Ok(definition) => definition,
            Err(why) => {
                cluster.malformed(channel, &format!("channel definition: {why}"));
                return Err(unavailable(format!(
                    "the channel's definition in redis is unreadable: {why}"
                )));
            }
        };
        let before = self.channels.settings_source(channel);
        match self
            .channels
            .define(channel, definition, SettingsSource::Cluster)
        {
            Ok(true) if before == Some(SettingsSource::Local) => {
                cluster.stats.local_definitions_overridden += 1;
                info!(
                    "channel `{channel}`: another node's create came first; its settings apply here too ({})",
                    definition.encode()
                );
                Ok(())
            }
            Ok(_) => Ok(()),
            Err(e) => {
                cluster.definition_not_applied(channel, &e.message);
                Err(e)
            }
        }
    }

    /// Redis lost its data, channel definitions included: this node offers
    /// again the ones it holds. Every node holds the same, so the first
    /// one Redis records again is the same too.
    fn redefine_after_reset(&mut self) {
        let cluster = self.cluster.as_mut().expect("called with a cluster");
        let definitions = self.channels.cluster_definitions();
        let total = definitions.len();
        for (sent, (channel, definition)) in definitions.into_iter().enumerate() {
            if cluster.define(&channel, &definition, false, None).is_err() {
                warn!(
                    "redis lost its data: only {sent} of {total} channel definitions could be offered again \
                     (the link's queue is full); the rest stay in force on the nodes that have them"
                );
                break;
            }
        }
    }

    /// Sends a channel message through Redis; when the link cannot take it
    /// now it is delivered on this node at once (`"local": true`).
    fn relay(
        &mut self,
        channel: &str,
        data: Value,
        reply: Option<Reply>,
        now: Instant,
        out: &mut impl Outbox,
    ) {
        let ts = unix_millis();
        let cluster = self.cluster.as_mut().expect("relay needs a cluster");
        let payload = scale_out::message_payload(&cluster.run, ts, &data);
        if !cluster.publish(channel, payload, reply.clone()) {
            return;
        }
        match self.apply_message(channel, None, ts, data, Apply::Deliver, now, out) {
            Ok(published) => {
                if let Some(reply) = reply {
                    let extra = json!({ "channel": channel, "offset": null, "delivered": published.delivered, "local": true });
                    out.reply(reply.conn, Message::Text(&ack(&reply.id, "publish", extra)));
                }
            }
            Err(e) => {
                if let Some(reply) = reply {
                    self.send_error(reply.conn, &reply.id, &e, out);
                }
            }
        }
    }

    /// Sends the chat lines said since the last call through Redis.
    fn flush_chat(&mut self, out: &mut impl Outbox) {
        let Some(lines) = self.chat.relay.as_mut().map(std::mem::take) else {
            return;
        };
        for line in lines {
            let cluster = self
                .cluster
                .as_mut()
                .expect("chat relays only with a cluster");
            let channel = format!("{CHAT_PREFIX}{}", line.room);
            let payload = scale_out::chat_payload(&cluster.run, &line);
            if cluster.publish(&channel, payload, None) {
                self.chat.deliver(line, out);
            }
        }
        self.flush_presence(out);
    }

    /// Sends the presence changes since the last call to Redis, then the
    /// plain `/who` requests (answered after those changes).
    fn flush_presence(&mut self, out: &mut impl Outbox) {
        let Some(presence) = self.chat.presence.as_mut().map(std::mem::take) else {
            return;
        };
        let cluster = self
            .cluster
            .as_mut()
            .expect("chat presence only with a cluster");
        for change in &presence.changes {
            cluster.presence(change);
        }
        for change in presence.nicks {
            match change {
                NickChange::Claim {
                    conn,
                    nick,
                    asked: true,
                } => {
                    let Some(reply) = self.reply_to(conn, None) else {
                        continue;
                    };
                    match self.claim_nick(conn, &nick, reply, true, out) {
                        Ok(Some(_)) => {
                            out.reply(conn, Message::Text(&chat::nicks::local_nick_line(&nick)))
                        }
                        Ok(None) => {}
                        Err(e) => out.reply(conn, Message::Text(&format!("! {}", e.message))),
                    }
                }
                NickChange::Claim {
                    conn,
                    nick,
                    asked: false,
                } => self.claim_held_nick(conn, nick),
                NickChange::Release { conn, nick } => self.release_nick(conn, &nick),
            }
        }
        for join in presence.joins {
            self.ask_for_join(join, out);
        }
        for conn in presence.rooms {
            if let Some(reply) = self.reply_to(conn, None) {
                self.ask_rooms(reply, true, out);
            }
        }
        for request in presence.who {
            let Some(reply) = self.reply_to(request.conn, None) else {
                continue;
            };
            let cluster = self.cluster.as_mut().expect("checked above");
            match cluster.link.who(&request.room) {
                Ok(id) => {
                    let room = request.room;
                    cluster.whos.insert(
                        id,
                        WhoWaiting {
                            reply,
                            room,
                            plain: true,
                        },
                    );
                }
                Err(e) => {
                    let waiting = WhoWaiting {
                        reply,
                        room: request.room,
                        plain: true,
                    };
                    self.answer_who(waiting, Err(e.to_string()), out);
                }
            }
        }
    }

    /// Everything the Redis link handed over: call on each wake.
    pub fn on_cluster(&mut self, now: Instant, out: &mut impl Outbox) {
        let Some(cluster) = self.cluster.as_ref() else {
            return;
        };
        let inbound: Vec<Inbound> = cluster.link.drain().collect();
        for item in inbound {
            self.on_inbound(item, now, out);
        }
        self.flush_chat(out);
    }

    fn on_inbound(&mut self, item: Inbound, now: Instant, out: &mut impl Outbox) {
        let cluster = self.cluster.as_mut().expect("called with a cluster");
        match item {
            Inbound::Message {
                channel,
                offset,
                origin,
                origin_seq,
                payload,
            } => {
                log::trace!("bus: {channel} #{offset} from {origin}/{origin_seq}");
                if cluster.is_duplicate(&origin, &scale_out::payload_run(&payload), origin_seq) {
                    debug!("bus: skipped a second copy of {origin}'s message {origin_seq} on `{channel}`");
                    return;
                }
                let pending = if origin == cluster.node_id {
                    cluster.pending.remove(&origin_seq)
                } else {
                    None
                };
                let local = pending.as_ref().is_some_and(|p| p.local);
                if let Some(room) = channel.strip_prefix(CHAT_PREFIX) {
                    match scale_out::parse_chat_payload(room, &payload) {
                        Some(mut line) if !local => {
                            line.offset = Some(offset);
                            self.chat.deliver(line, out)
                        }
                        Some(_) => {}
                        None => cluster.malformed(&channel, "not a chat line"),
                    }
                    return;
                }
                let Some((ts, data)) = scale_out::parse_message_payload(&payload) else {
                    return cluster.malformed(&channel, "not a channel message");
                };
                let mode = if local {
                    Apply::RecordOnly
                } else {
                    Apply::Deliver
                };
                let result = self.apply_message(&channel, Some(offset), ts, data, mode, now, out);
                let reply = pending.and_then(|p| p.reply).filter(|r| self.still_open(r));
                match (result, reply) {
                    (Ok(published), Some(reply)) => {
                        let extra = json!({ "channel": channel, "offset": offset, "delivered": published.delivered });
                        out.reply(reply.conn, Message::Text(&ack(&reply.id, "publish", extra)));
                    }
                    (Err(e), Some(reply)) => self.send_error(reply.conn, &reply.id, &e, out),
                    (Err(e), None) => {
                        debug!("bus message on `{channel}` not applied: {}", e.message)
                    }
                    (Ok(_), None) => {}
                }
            }
            Inbound::History {
                request,
                channel,
                result,
            } => {
                let Some(resume) = cluster.resumes.remove(&request) else {
                    if let Some(join) = cluster.join_parts.remove(&request) {
                        let recent = result.map(|h| {
                            let room = channel.strip_prefix(CHAT_PREFIX).unwrap_or_default();
                            let (lines, malformed) = scale_out::chat_history(room, &h.entries);
                            if malformed > 0 {
                                cluster.malformed(&channel, "not a chat line");
                            }
                            (lines, h.last_offset)
                        });
                        if let Some(waiting) = cluster.joins.get_mut(&join) {
                            waiting.recent = Some(recent);
                        }
                        self.try_finish_join(join, out);
                    }
                    return;
                };
                if !self.still_open(&resume.reply) {
                    return;
                }
                let Reply { conn, id, .. } = resume.reply;
                let outcome = match result {
                    Err(e) => Err(unavailable(format!(
                        "the channel's history is unavailable: {e}"
                    ))),
                    Ok(h) if h.missed > 0 || h.more || resume.since > h.last_offset => {
                        let first = h.entries.first().map(|e| e.offset);
                        Err(channels::not_recoverable(
                            &channel,
                            resume.since,
                            first,
                            h.last_offset,
                        ))
                    }
                    Ok(h) => {
                        let frames = h
                            .entries
                            .iter()
                            .filter_map(|e| {
                                let (ts, data) = scale_out::parse_message_payload(&e.payload)?;
                                Some(channels::message_frame(&channel, Some(e.offset), ts, &data))
                            })
                            .collect();
                        self.channels.subscribe_resumed(
                            conn,
                            &resume.channel,
                            h.last_offset,
                            frames,
                        )
                    }
                };
                match outcome {
                    Ok((extra, replay)) => {
                        out.reply(conn, Message::Text(&ack(&id, "subscribe", extra)));
                        for frame in &replay {
                            out.reply_shared(conn, frame);
                        }
                    }
                    Err(e) => self.send_error(conn, &id, &e, out),
                }
            }
            Inbound::Definition {
                channel,
                definition,
                created,
                origin,
                origin_seq,
            } => {
                let pending = if origin == cluster.node_id {
                    cluster.definitions.remove(&origin_seq)
                } else {
                    None
                };
                let result = self.apply_definition(&channel, &definition);
                let Some(reply) = pending.and_then(|p| p.reply).filter(|r| self.still_open(r))
                else {
                    return;
                };
                match result {
                    Ok(()) => {
                        let mut extra = self
                            .channels
                            .describe(&channel)
                            .unwrap_or_else(|| json!({}));
                        extra["created"] = json!(created);
                        out.reply(reply.conn, Message::Text(&ack(&reply.id, "create", extra)));
                    }
                    Err(e) => self.send_error(reply.conn, &reply.id, &e, out),
                }
            }
            Inbound::Definitions { definitions } => {
                for (channel, definition) in definitions {
                    // Failures are counted and logged by apply_definition.
                    let _ = self.apply_definition(&channel, &definition);
                }
            }
            Inbound::Who {
                request,
                room: _,
                result,
            } => {
                if let Some(waiting) = cluster.whos.remove(&request) {
                    self.answer_who(waiting, result, out);
                } else if let Some(join) = cluster.join_parts.remove(&request) {
                    if let Some(waiting) = cluster.joins.get_mut(&join) {
                        waiting.members = Some(result);
                    }
                    self.try_finish_join(join, out);
                }
            }
            Inbound::Nick {
                request,
                nick,
                result,
            } => self.on_nick_answer(request, nick, result, out),
            Inbound::Rooms { request, result } => {
                if let Some((reply, plain)) = cluster.rooms_waiting.remove(&request) {
                    self.answer_rooms(reply, plain, result, out);
                }
            }
            Inbound::Up => {
                cluster.on_up();
                self.rewrite_presence();
                self.reassert_nicks();
            }
            Inbound::Down { .. } => {
                cluster.on_down();
                self.settle_nicks_locally(out);
            }
            Inbound::Reset => {
                cluster.stats.resets += 1;
                warn!("redis lost its data: channel offsets start again from 1; backlogs emptied");
                self.channels.reset_offsets();
                self.redefine_after_reset();
                self.rewrite_presence();
                self.reassert_nicks();
            }
            Inbound::Lost { count, kind } => {
                if let Some((reply, what)) = cluster.on_lost(count, kind) {
                    if self.still_open(&reply) {
                        let e = unavailable(format!("the {what} was lost: redis refused it"));
                        self.send_error(reply.conn, &reply.id, &e, out);
                    }
                }
            }
        }
    }

    /// The scale-out part of `GET /metrics`.
    fn write_cluster_metrics(&self, m: &mut Metrics) {
        let Some(cluster) = self.cluster.as_ref() else {
            return;
        };
        let link = cluster.link.stats();
        let c = &cluster.stats;
        let up = link.state == crate::cluster::LinkState::Up;
        m.gauge(
            "fanout_redis_up",
            "1 when the Redis link is up, 0 during an outage or while connecting.",
            if up { 1.0 } else { 0.0 },
        );
        for (name, help, value) in [
            (
                "fanout_redis_outages_total",
                "Redis outages (the link went down).",
                link.outages,
            ),
            (
                "fanout_redis_reconnects_total",
                "Redis connections re-established.",
                link.reconnects,
            ),
            (
                "fanout_redis_connect_failures_total",
                "Failed Redis connection attempts.",
                link.connect_failures,
            ),
            (
                "fanout_redis_published_total",
                "Publishes Redis applied.",
                link.published,
            ),
            (
                "fanout_redis_received_total",
                "Bus messages received.",
                link.received,
            ),
            (
                "fanout_redis_resets_total",
                "Times Redis lost its data (offsets restarted).",
                link.resets,
            ),
            (
                "fanout_redis_local_deliveries_total",
                "Messages delivered by this node alone (offset null) because the link was not up.",
                c.local_deliveries,
            ),
            (
                "fanout_redis_malformed_total",
                "Bus messages not understood, skipped.",
                c.malformed + link.malformed,
            ),
            (
                "fanout_redis_duplicates_total",
                "Second copies of a bus message (resent across a Redis data loss), skipped.",
                c.duplicates,
            ),
            (
                "fanout_redis_presence_lost_total",
                "Chat presence changes that did not reach Redis (queue full or refused).",
                link.presence_lost,
            ),
            (
                "fanout_redis_defined_total",
                "Channel definitions (create) this node sent that Redis applied.",
                link.defined,
            ),
            (
                "fanout_redis_definitions_not_applied_total",
                "Channel definitions from Redis this node could not apply (channel limit, invalid name).",
                c.definitions_not_applied,
            ),
            (
                "fanout_redis_local_definitions_overridden_total",
                "Channels created here during an outage whose settings the cluster's definition replaced.",
                c.local_definitions_overridden,
            ),
            (
                "fanout_redis_nick_conflicts_total",
                "Chat members renamed because a member of another node held their nick in Redis.",
                c.nick_conflicts,
            ),
        ] {
            m.counter(name, help, value);
        }
        for (name, help, value) in [
            (
                "fanout_redis_down_seconds",
                "Length of the current Redis outage (0 when up).",
                link.down_ms as f64 / 1000.0,
            ),
            (
                "fanout_redis_down_seconds_total",
                "Total time the Redis link spent down.",
                link.down_total_ms as f64 / 1000.0,
            ),
            (
                "fanout_redis_lag_seconds",
                "Age of the newest bus entry read (0 when caught up).",
                link.lag_ms as f64 / 1000.0,
            ),
            (
                "fanout_redis_outbound_queued",
                "Publishes and history requests waiting for Redis.",
                link.outbound_queued as f64,
            ),
            (
                "fanout_redis_inbound_queued",
                "Bus messages waiting for the event loop.",
                link.inbound_queued as f64,
            ),
        ] {
            m.gauge(name, help, value);
        }
        m.family(
            "fanout_redis_lost_total",
            "Messages that will never go through Redis, by reason.",
            "counter",
            &[
                (&[("reason", "queue_full")], link.lost_queue_full as f64),
                (&[("reason", "rejected")], link.lost_rejected as f64),
                (&[("reason", "bus_gap")], link.lost_bus_gap as f64),
                (&[("reason", "shutdown")], link.lost_at_shutdown as f64),
            ],
        );
    }
}

fn unavailable(message: String) -> ProtocolError {
    ProtocolError::new(ErrorCode::Unavailable, message)
}

fn untrusted_event_publisher() -> ProtocolError {
    ProtocolError::new(
        ErrorCode::Forbidden,
        format!(
            "publishing to `{EVENTS_CHANNEL}` needs a trusted connection: the internal listener, or `auth` with a \
             publisher key"
        ),
    )
}

/// An event for the registration streams: a JSON object with a string `type`.
fn event_fields(data: &Value) -> Result<serde_json::Map<String, Value>, ProtocolError> {
    match data {
        Value::Object(fields) if fields.get("type").is_some_and(Value::is_string) => Ok(fields.clone()),
        _ => Err(ProtocolError::new(
            ErrorCode::InvalidField,
            format!("field `data` must be an event: a JSON object with a string `type` (publishing to `{EVENTS_CHANNEL}`)"),
        )),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::HashSet;

    use super::*;

    /// An outbox that records everything; connections in `full` refuse fan-out.
    #[derive(Debug, Default)]
    pub struct RecordingOutbox {
        pub replies: Vec<(ConnId, String)>,
        pub delivered: Vec<(ConnId, SharedFrame)>,
        pub closed: Vec<(ConnId, u16)>,
        pub full: HashSet<ConnId>,
    }

    fn frame_text(frame: &SharedFrame) -> String {
        let bytes = frame.bytes();
        let header = match bytes[1] & 0x7F {
            126 => 4,
            127 => 10,
            _ => 2,
        };
        String::from_utf8(bytes[header..].to_vec()).unwrap()
    }

    impl Outbox for RecordingOutbox {
        fn reply(&mut self, to: ConnId, message: Message<'_>) {
            let text = match message {
                Message::Text(t) => t.to_owned(),
                Message::Binary(b) => format!("{b:?}"),
            };
            self.replies.push((to, text));
        }

        fn reply_shared(&mut self, to: ConnId, frame: &SharedFrame) {
            self.replies.push((to, frame_text(frame)));
        }

        fn deliver(&mut self, to: ConnId, frame: &SharedFrame) -> bool {
            if self.full.contains(&to) {
                return false;
            }
            self.delivered.push((to, frame.clone()));
            true
        }

        fn close(&mut self, to: ConnId, code: CloseCode, _reason: &str) {
            self.closed.push((to, code.0));
        }
    }
}
