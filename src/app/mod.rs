//! What each endpoint does with messages. Nothing here knows about
//! sockets: the server hands the app (connection, message) pairs and an
//! [`Outbox`] to answer through, addressed by connection id. A message for
//! many recipients is encoded once as a [`SharedFrame`] and handed to each.

mod auth;
pub mod channel_name;
pub mod channels;
pub mod chat;
pub mod chat_command;
mod echo;
pub mod event_filter;
pub mod event_stream;
pub mod market;
pub mod protocol;
pub mod routes;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use log::{debug, warn};
use serde_json::{json, Map, Value};

use self::auth::KeyRing;
use self::channels::Published;
use self::channels::{ChannelLimits, Channels};
use self::chat::{Chat, LineKind};
use self::event_stream::{Event, EventStreams};
use self::market::legacy::{self, LegacyCommand};
use self::market::Market;
use self::protocol::{ack, error, parse_request, Command, ErrorCode, ProtocolError, Request};
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
                trusted,
                auth_failures: 0,
            },
        );
        match endpoint {
            Endpoint::Echo | Endpoint::Kline => {}
            Endpoint::Chat => self.chat.on_plain_open(conn, out),
            Endpoint::Ws => self.streams.on_open(conn, self.next_serial, now, out),
        }
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
        if let Some(command) = legacy::parse(text) {
            self.streams.on_other_request(conn);
            return self.legacy_kline(conn, command, out);
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
            Message::Text(text) => match legacy::parse(text) {
                Some(command) => self.legacy_kline(conn, command, out),
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

    fn legacy_kline(&mut self, conn: ConnId, command: LegacyCommand<'_>, out: &mut impl Outbox) {
        match command {
            LegacyCommand::Subscribe(interval) => self.market.legacy_subscribe(conn, interval, out),
            LegacyCommand::Unsubscribe => self.market.legacy_unsubscribe(conn),
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
            Command::Create { channel, settings } => {
                self.require_trusted(conn, "create channels")?;
                let extra = self.channels.create(&channel, &settings)?;
                acknowledge(out, "create", extra);
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
            Command::ChatNick { nick } => {
                let extra = self.chat.rename(conn, &nick, out)?;
                acknowledge(out, "chat.nick", extra);
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
    /// owners and to the `alerts` channel).
    fn publish_event(
        &mut self,
        fields: Map<String, Value>,
        now: Instant,
        out: &mut impl Outbox,
    ) -> Result<Published, ProtocolError> {
        let data = Value::Object(fields);
        let published = self
            .channels
            .publish(EVENTS_CHANNEL, &data, true, now, out)?;
        let Value::Object(fields) = data else {
            unreachable!("built as an object above")
        };
        let event = Event::new(fields);
        self.streams.publish(&event, out);
        let json =
            std::str::from_utf8(event.frame.payload()).expect("events are encoded from JSON text");
        for fired in self.market.on_event(&event.fields, json, now, out) {
            out.reply(fired.conn, Message::Text(&fired.message.to_string()));
            if let Err(e) = self
                .channels
                .publish(ALERTS_CHANNEL, &fired.message, true, now, out)
            {
                debug!("alert not published on `{ALERTS_CHANNEL}`: {}", e.message);
            }
        }
        Ok(published)
    }
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
