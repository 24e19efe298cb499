//! The `/ws` request router: parses a request, checks who may make it,
//! hands it to its domain ([`super::channels`], [`super::chat`],
//! [`super::events`], [`super::market`]) and answers. Whether the answer
//! comes now or once Redis has answered is the domain's outcome
//! ([`Sent`], [`Answer`]), so no arm here asks which bus this node has.
//! `/kline`'s text protocol enters here too, as it is also accepted on
//! `/ws`.

use std::time::Instant;

use log::warn;
use serde_json::{json, Value};

use super::bus::Bus;
use super::channels::name::validate_pattern;
use super::chat::LineKind;
use super::market::kline_text::{self, TextCommand};
use super::protocol::{
    ack, error, parse_request, Command, Credential, ErrorCode, ProtocolError, Request,
};
use super::publishing::{Answer, Sent};
use super::tokens::{PublishRight, Refusal, RefusalKind};
use super::{ConnId, Message, Node, Outbox, EVENTS_CHANNEL};
use crate::ws::CloseCode;

impl Node {
    pub(super) fn on_ws_message(
        &mut self,
        bus: &mut Bus,
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
                if let Err(e) = self.handle(bus, conn, request, now, out) {
                    self.send_error(conn, &id, &e, out);
                }
            }
            Err((id, e)) => self.send_error(conn, &id, &e, out),
        }
    }

    /// `/kline`: only the K-line service's plain-text commands.
    pub(super) fn on_kline_message(
        &mut self,
        conn: ConnId,
        message: Message<'_>,
        out: &mut impl Outbox,
    ) {
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
            TextCommand::Unsubscribe => self.market.kline_text_unsubscribe(conn, out),
        }
    }

    fn handle<O: Outbox>(
        &mut self,
        bus: &mut Bus,
        conn: ConnId,
        request: Request,
        now: Instant,
        out: &mut O,
    ) -> Result<(), ProtocolError> {
        let Request { id, command } = request;
        let acknowledge = |out: &mut O, request: &str, extra: Value| {
            out.reply(conn, Message::Text(&ack(&id, request, extra)))
        };
        // Answered now, or by whoever handles Redis's answer.
        let answer = |out: &mut O, request: &str, answer: Answer| {
            if let Answer::Now(extra) = answer {
                acknowledge(out, request, extra);
            }
        };
        match command {
            Command::Register { filters } => {
                self.streams.register(conn, filters, out);
            }
            Command::Auth(Credential::Key(key)) => self.authenticate(conn, &key, &id, out)?,
            Command::Auth(Credential::Token(token)) => {
                self.authenticate_token(conn, &token, &id, now, out)?
            }
            Command::Create { channel, settings } => {
                self.require_trusted(conn, "create channels")?;
                let created = self.create_channel(bus, conn, &channel, &settings, &id)?;
                answer(out, "create", created);
            }
            Command::Publish { channel, data } => {
                // A token's `publish` claim names the channels it may
                // publish to, and lets it publish there as a trusted
                // connection may.
                let trusted = match self.grants.publish_right(conn, &channel) {
                    PublishRight::Unchanged => self.is_trusted(conn),
                    PublishRight::Granted => true,
                    PublishRight::Refused(e) => return Err(e),
                };
                if channel == EVENTS_CHANNEL {
                    check_event(&data)?;
                    if !trusted {
                        return Err(untrusted_event_publisher());
                    }
                }
                self.channels.authorize(&channel, trusted)?;
                self.stats.published += 1;
                match self.send_message(bus, &channel, data, Some((conn, &id)), now, out)? {
                    Sent::Numbered(published) => {
                        let extra = json!({ "channel": channel, "offset": published.offset, "delivered": published.delivered });
                        acknowledge(out, "publish", extra);
                    }
                    Sent::Pending => {}
                    Sent::Local(published) => {
                        let extra = json!({ "channel": channel, "offset": null, "delivered": published.delivered, "local": true });
                        acknowledge(out, "publish", extra);
                    }
                }
            }
            Command::Subscribe { channel, since } => {
                validate_pattern("channel", &channel)?;
                self.grants.check_subscribe(conn, &channel)?;
                self.subscribe(bus, conn, channel, since, &id, now, out)?
            }
            Command::Unsubscribe { channel } => {
                let extra = self.channels.unsubscribe(conn, &channel)?;
                acknowledge(out, "unsubscribe", extra);
            }
            Command::ListChannels => acknowledge(out, "list", self.channels.list()),
            Command::ChatJoin { room } => {
                self.chat.join(conn, &room, &id, out, |info| {
                    ack(&id, "chat.join", info.clone())
                })?;
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
                let renamed = self.chat_nick(bus, conn, &nick, &id, out)?;
                answer(out, "chat.nick", renamed);
            }
            Command::ChatWho { room } => {
                let members = self.chat_who(bus, conn, room, &id)?;
                answer(out, "chat.who", members);
            }
            Command::ChatRooms => {
                let rooms = self.chat_rooms(bus, conn, &id, out);
                answer(out, "chat.rooms", rooms);
            }
            Command::KlineSubscribe(request) => {
                self.market
                    .kline_subscribe(conn, &request, out, |details| {
                        ack(&id, "kline.subscribe", details)
                    })?;
            }
            Command::KlineUnsubscribe { symbol, interval } => {
                let extra = self
                    .market
                    .kline_unsubscribe(conn, &symbol, &interval, out)?;
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
        if self.is_trusted(conn) {
            Ok(())
        } else {
            Err(ProtocolError::new(
                ErrorCode::Forbidden,
                format!("only trusted connections may {action}: use the internal listener, or `auth` with a publisher key or a publisher's token"),
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
        // With no keys configured every attempt fails, and counts like any
        // other: a client that keeps trying is closed all the same.
        let why = if self.keys.is_empty() {
            "this server accepts no publisher keys; publish from the internal listener"
        } else {
            "publisher key rejected"
        };
        if self.keys.verify(key) {
            client.trusted = true;
            client.auth_failures = 0;
            out.reply(
                conn,
                Message::Text(&ack(id, "auth", json!({ "trusted": true }))),
            );
            return Ok(());
        }
        self.auth_failed(conn, why, "publisher key rejected", id, out)
    }

    /// `auth` with a token: a fresh grant for the connection (its expiry
    /// timer starts again), which may make it a trusted publisher. A
    /// refused token counts as a failed `auth` like a wrong key.
    fn authenticate_token(
        &mut self,
        conn: ConnId,
        token: &str,
        id: &Option<Value>,
        now: Instant,
        out: &mut impl Outbox,
    ) -> Result<(), ProtocolError> {
        if !self.clients.contains_key(&conn) {
            return Ok(());
        }
        let verified = self.tokens.verify(token).and_then(|grant| {
            // A connection is one identity: a fresh token may not change it.
            match self.grants.get(conn).map(|held| &held.sub) {
                Some(held) if *held != grant.sub => Err(Refusal::new(
                    RefusalKind::OtherSubject,
                    format!(
                        "its `sub` {} is not this connection's, {}",
                        describe_sub(&grant.sub),
                        describe_sub(held)
                    ),
                )),
                _ => Ok(grant),
            }
        });
        let grant = match verified {
            Ok(grant) => grant,
            Err(refusal) => {
                let why = self.token_refused(refusal);
                return self.auth_failed(conn, &why, "token refused", id, out);
            }
        };
        self.stats.tokens_accepted += 1;
        if let Some(client) = self.clients.get_mut(&conn) {
            client.auth_failures = 0;
        }
        if let Some(sub) = &grant.sub {
            self.chat.set_identity(conn, sub);
        }
        let extra = json!({ "sub": grant.sub, "expires_at": grant.expires_at, "publisher": grant.publisher });
        self.grants.insert(conn, grant, now);
        let mut extra = extra;
        extra["trusted"] = json!(self.is_trusted(conn));
        out.reply(conn, Message::Text(&ack(id, "auth", extra)));
        Ok(())
    }

    /// A failed `auth`: an error saying `why` and how many attempts are
    /// left, or, at `--max-auth-failures`, the close.
    fn auth_failed(
        &mut self,
        conn: ConnId,
        why: &str,
        what: &str,
        id: &Option<Value>,
        out: &mut impl Outbox,
    ) -> Result<(), ProtocolError> {
        let Some(client) = self.clients.get_mut(&conn) else {
            return Ok(());
        };
        client.auth_failures += 1;
        self.stats.auth_failures += 1;
        warn!(
            "conn {conn} from {}: {what} ({} failure(s))",
            client.info.peer, client.auth_failures
        );
        if client.auth_failures >= self.max_auth_failures {
            let e = ProtocolError::new(
                ErrorCode::AuthFailed,
                format!("{why}; too many failures, closing"),
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
            format!("{why}; {left} attempt(s) left"),
        ))
    }
}

fn describe_sub(sub: &Option<String>) -> String {
    match sub {
        Some(sub) => format!("`{sub}`"),
        None => "none".to_owned(),
    }
}

fn untrusted_event_publisher() -> ProtocolError {
    ProtocolError::new(
        ErrorCode::Forbidden,
        format!(
            "publishing to `{EVENTS_CHANNEL}` needs a trusted connection: the internal listener, or `auth` with a \
             publisher key or a publisher's token"
        ),
    )
}

/// An event for the registration streams: a JSON object with a string `type`.
fn check_event(data: &Value) -> Result<(), ProtocolError> {
    match data {
        Value::Object(fields) if fields.get("type").is_some_and(Value::is_string) => Ok(()),
        _ => Err(ProtocolError::new(
            ErrorCode::InvalidField,
            format!("field `data` must be an event: a JSON object with a string `type` (publishing to `{EVENTS_CHANNEL}`)"),
        )),
    }
}
