//! Channel messages and channel definitions on their way through the
//! [`Bus`]: the one path every message takes, whoever published it (a
//! client, a feed, an alert) and whichever bus this node has. A single
//! node numbers and delivers a message at once; with Redis it is applied
//! when it comes back on the bus (see [`super::bus`]). Messages on the
//! `events` channel also feed the registration streams and the market.
//!
//! These are [`Node`] methods because applying a message touches several
//! domains (channels, event streams, market) and may publish again (a
//! fired alert), so they take the bus as an argument.

use std::time::Instant;

use log::{debug, info, warn};
use serde_json::{json, Map, Value};

use super::bus::{
    parse_message_payload, Bus, MessageBus, Pending, RedisBus, Reply, Resume, Route, Ticket,
    Waiting,
};
use super::channels::definition::ChannelDefinition;
use super::channels::{self, Apply, Channels, Published, SettingsSource};
use super::events::stream::StreamEvent;
use super::protocol::{ack, ChannelSettings, ErrorCode, ProtocolError};
use super::{unix_millis, ConnId, Message, Node, Outbox, ALERTS_CHANNEL, EVENTS_CHANNEL};
use crate::cluster::{History, RequestError, MAX_HISTORY};

/// What became of a message a client published.
#[derive(Debug)]
pub(super) enum Sent {
    /// Numbered by this node (a single node) and delivered.
    Numbered(Published),
    /// On its way through Redis: acked when it comes back.
    Pending,
    /// Delivered on this node alone, unnumbered (the link is not up).
    Local(Published),
}

/// A request's answer: now, or when Redis has answered (then sent by
/// whatever handles that answer).
#[derive(Debug)]
pub(super) enum Answer {
    Now(Value),
    Later,
}

pub(super) fn unavailable(message: String) -> ProtocolError {
    ProtocolError::new(ErrorCode::Unavailable, message)
}

impl Node {
    /// Sends a channel message (authorised already) over the bus and, as
    /// the bus routes it, applies it here now. `asker`: the connection
    /// and request id an ack goes to (None: the server's own message).
    pub(super) fn send_message(
        &mut self,
        bus: &mut impl MessageBus,
        channel: &str,
        data: Value,
        asker: Option<(ConnId, &Option<Value>)>,
        now: Instant,
        out: &mut impl Outbox,
    ) -> Result<Sent, ProtocolError> {
        let ts = unix_millis();
        let reply = || asker.and_then(|(conn, id)| self.reply_to(conn, id.clone()));
        let (offset, numbered) = match bus.send(channel, ts, &data, reply) {
            // Offered to the sinks when it comes back from Redis.
            Route::Pending => return Ok(Sent::Pending),
            Route::Here => (Some(self.channels.next_offset(channel)), true),
            Route::Fallback => (None, false),
        };
        let sink_copy = self.sinks.want_channel(channel).then(|| data.clone());
        let applied =
            self.apply_message(bus, channel, offset, ts, data, Apply::Deliver, now, out)?;
        if let Some(data) = sink_copy {
            self.offer_to_sinks(channel, offset, ts, &data);
        }
        Ok(if numbered {
            Sent::Numbered(applied)
        } else {
            Sent::Local(applied)
        })
    }

    /// A message this node published, for the sinks that take its
    /// channel, encoded as its subscribers receive it.
    fn offer_to_sinks(&self, channel: &str, offset: Option<u64>, ts: u64, data: &Value) {
        let frame = channels::message_frame(channel, offset, ts, data);
        let encoded = std::str::from_utf8(frame.payload())
            .expect("channel messages are encoded from JSON text");
        self.sinks.offer_channel(channel, data, encoded);
    }

    /// An event the server itself publishes (a feed's): the `events`
    /// channel (offsets, backlog, subscribers), the registration streams,
    /// and the market.
    pub(super) fn publish_event(
        &mut self,
        bus: &mut impl MessageBus,
        fields: Map<String, Value>,
        now: Instant,
        out: &mut impl Outbox,
    ) -> Result<(), ProtocolError> {
        self.channels.authorize(EVENTS_CHANNEL, true)?;
        self.send_message(bus, EVENTS_CHANNEL, Value::Object(fields), None, now, out)
            .map(|_| ())
    }

    /// What an event does besides being a channel message: the
    /// registration streams, and the market (candles, filters, alerts,
    /// whose firings go to their owners and to the `alerts` channel).
    fn event_effects(
        &mut self,
        bus: &mut impl MessageBus,
        data: Value,
        ts: u64,
        now: Instant,
        out: &mut impl Outbox,
    ) {
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
            let encoded = fired.message.to_string();
            out.reply(fired.conn, Message::Text(&encoded));
            // Made here, so delivered outside from here (other nodes see
            // it only on the `alerts` channel).
            self.sinks.offer_alert(&fired.message, &encoded);
            let published = self
                .channels
                .authorize(ALERTS_CHANNEL, true)
                .and_then(|()| {
                    self.send_message(bus, ALERTS_CHANNEL, fired.message, None, now, out)
                });
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
        bus: &mut impl MessageBus,
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
            self.event_effects(bus, data, ts, now, out);
        }
        Ok(published)
    }

    /// `create`: a single node creates the channel now; with Redis the
    /// definition goes through Redis, where the first one of a channel
    /// wins (see [`Node::create_through_redis`]).
    pub(super) fn create_channel(
        &mut self,
        bus: &mut Bus,
        conn: ConnId,
        channel: &str,
        settings: &ChannelSettings,
        id: &Option<Value>,
    ) -> Result<Answer, ProtocolError> {
        match bus {
            Bus::Local => self.channels.create(channel, settings).map(Answer::Now),
            Bus::Redis(redis) => {
                let reply = self.reply_to(conn, id.clone());
                self.create_through_redis(redis, channel, settings, reply)
            }
        }
    }

    /// Scale-out `create`: its ack waits for the definition in force. A
    /// channel with the cluster's definition already, or the link not up:
    /// answered at once (the latter with `"local": true`, and the
    /// definition queued for Redis).
    fn create_through_redis(
        &mut self,
        redis: &mut RedisBus,
        channel: &str,
        settings: &ChannelSettings,
        reply: Option<Reply>,
    ) -> Result<Answer, ProtocolError> {
        let definition = self.channels.resolve(settings)?;
        self.channels.check_room_for(channel)?;
        let up = redis.is_up();
        let answer = |channels: &Channels, created: bool, local: bool| {
            let mut extra = channels.describe(channel).unwrap_or_else(|| json!({}));
            extra["created"] = json!(created);
            if local {
                extra["local"] = json!(true);
            }
            Answer::Now(extra)
        };
        match self.channels.settings_source(channel) {
            // Redis's definitions never change (until it loses its data).
            Some(SettingsSource::Cluster) => return Ok(answer(&self.channels, false, false)),
            // Made here during this outage; its definition is queued.
            Some(SettingsSource::Local) if !up => return Ok(answer(&self.channels, false, true)),
            _ => {}
        }
        let waiting = if up { reply } else { None };
        redis
            .define(channel, &definition, !up, waiting)
            .map_err(|e| {
                unavailable(format!(
                    "cannot create the channel on every node now ({e}); try again"
                ))
            })?;
        if up {
            return Ok(Answer::Later);
        }
        self.channels
            .define(channel, definition, SettingsSource::Local)?;
        Ok(answer(&self.channels, true, true))
    }

    /// `subscribe`: from this node's backlog, or (scale-out, a `since`
    /// older than the backlog here) from the channel's history in Redis.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn subscribe(
        &mut self,
        bus: &mut Bus,
        conn: ConnId,
        channel: String,
        since: Option<u64>,
        id: &Option<Value>,
        now: Instant,
        out: &mut impl Outbox,
    ) -> Result<(), ProtocolError> {
        if let (Bus::Redis(redis), Some(since)) = (bus, since) {
            if !self.channels.can_replay_locally(&channel, since, now) {
                return self.resume_from_redis(redis, conn, channel, since, id.clone());
            }
        }
        let (extra, replay) = self.channels.subscribe(conn, &channel, since, now)?;
        out.reply(conn, Message::Text(&ack(id, "subscribe", extra)));
        for frame in &replay {
            out.reply_shared(conn, frame);
        }
        Ok(())
    }

    /// Asks Redis for a channel's history after `since`; the subscription
    /// is made and answered when it comes ([`Node::answer_resume`]).
    fn resume_from_redis(
        &mut self,
        redis: &mut RedisBus,
        conn: ConnId,
        channel: String,
        since: u64,
        id: Option<Value>,
    ) -> Result<(), ProtocolError> {
        self.channels.check_subscribe(conn, &channel, Some(since))?;
        let request = redis
            .link()
            .history(&channel, since, MAX_HISTORY)
            .map_err(|e| unavailable(format!("cannot read the channel's history: {e}")))?;
        let Some(reply) = self.reply_to(conn, id) else {
            return Ok(());
        };
        let resume = Resume {
            reply,
            channel,
            since,
        };
        redis.wait(Ticket::Request(request), Waiting::Resume(resume));
        Ok(())
    }

    /// Redis answered a `subscribe` with `since`.
    pub(super) fn answer_resume(
        &mut self,
        resume: Resume,
        channel: &str,
        result: Result<History, RequestError>,
        out: &mut impl Outbox,
    ) {
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
                    channel,
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
                        let (ts, data) = parse_message_payload(&e.payload)?;
                        Some(channels::message_frame(channel, Some(e.offset), ts, &data))
                    })
                    .collect();
                self.channels
                    .subscribe_resumed(conn, &resume.channel, h.last_offset, frames)
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

    /// A channel message from the bus (any node's, this one's included):
    /// applied with the offset Redis gave it, and its publisher answered
    /// if it waits here. One this node delivered already during an outage
    /// (`pending.local`) is only recorded.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn on_bus_message(
        &mut self,
        redis: &mut RedisBus,
        channel: &str,
        offset: u64,
        payload: &str,
        pending: Option<Pending>,
        now: Instant,
        out: &mut impl Outbox,
    ) {
        let Some((ts, data)) = parse_message_payload(payload) else {
            return redis.malformed(channel, "not a channel message");
        };
        let mode = if pending.as_ref().is_some_and(|p| p.local) {
            Apply::RecordOnly
        } else {
            Apply::Deliver
        };
        // This node's own publish, not delivered here during an outage
        // already: the sinks take it now that it has its offset.
        let ours = pending.as_ref().is_some_and(|p| !p.local);
        let sink_copy = (ours && self.sinks.want_channel(channel)).then(|| data.clone());
        let result = self.apply_message(redis, channel, Some(offset), ts, data, mode, now, out);
        if let (Some(data), Ok(_)) = (sink_copy, &result) {
            self.offer_to_sinks(channel, Some(offset), ts, &data);
        }
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

    /// A channel definition announced on the bus: applied here, and the
    /// `create` waiting for it (this node's) answered.
    pub(super) fn on_definition(
        &mut self,
        redis: &mut RedisBus,
        channel: &str,
        definition: &str,
        created: bool,
        pending: Option<Pending>,
        out: &mut impl Outbox,
    ) {
        let result = self.apply_definition(redis, channel, definition);
        let Some(reply) = pending.and_then(|p| p.reply).filter(|r| self.still_open(r)) else {
            return;
        };
        match result {
            Ok(()) => {
                let mut extra = self.channels.describe(channel).unwrap_or_else(|| json!({}));
                extra["created"] = json!(created);
                out.reply(reply.conn, Message::Text(&ack(&reply.id, "create", extra)));
            }
            Err(e) => self.send_error(reply.conn, &reply.id, &e, out),
        }
    }

    /// Applies a channel definition from Redis (the cluster's, for every
    /// node); what cannot be applied is counted.
    pub(super) fn apply_definition(
        &mut self,
        redis: &mut RedisBus,
        channel: &str,
        text: &str,
    ) -> Result<(), ProtocolError> {
        let definition = match ChannelDefinition::decode(text) {
            Ok(definition) => definition,
            Err(why) => {
                redis.malformed(channel, &format!("channel definition: {why}"));
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
                redis.stats.local_definitions_overridden += 1;
                info!(
                    "channel `{channel}`: another node's create came first; its settings apply here too ({})",
                    definition.encode()
                );
                Ok(())
            }
            Ok(_) => Ok(()),
            Err(e) => {
                redis.definition_not_applied(channel, &e.message);
                Err(e)
            }
        }
    }

    /// Redis lost its data, channel definitions included: this node offers
    /// again the ones it holds. Every node holds the same, so the first
    /// one Redis records again is the same too.
    pub(super) fn redefine_after_reset(&mut self, redis: &mut RedisBus) {
        let definitions = self.channels.cluster_definitions();
        let total = definitions.len();
        for (sent, (channel, definition)) in definitions.into_iter().enumerate() {
            if redis.define(&channel, &definition, false, None).is_err() {
                warn!(
                    "redis lost its data: only {sent} of {total} channel definitions could be offered again \
                     (the link's queue is full); the rest stay in force on the nodes that have them"
                );
                break;
            }
        }
    }
}
