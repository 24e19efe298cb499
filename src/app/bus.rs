//! The bus: how what every node must see alike (channel messages, channel
//! definitions, chat lines, presence and nicks) gets to every node. One
//! path for both set-ups: the app hands a message to the [`Bus`] and gets
//! back one [`Route`]:
//!
//! * [`Bus::Local`], a single node: [`Route::Here`], the node numbers the
//!   message itself (the channel's next offset) and delivers it now;
//! * [`Bus::Redis`], scale-out over Redis ([`RedisBus`], over the
//!   [`crate::cluster::RedisLink`] transport): [`Route::Pending`], Redis
//!   numbers it and the ack waits for it to come back on the bus, or
//!   [`Route::Fallback`] while the link cannot take it (delivered here
//!   alone, unnumbered).
//!
//! Everything waiting for Redis (publishes and definitions by
//! `origin_seq`, reads and nick claims by request, joins) is in one table
//! of the [`RedisBus`], keyed by [`Ticket`].
//!
//! # Scale-out
//!
//! With `--redis`, everything that several nodes must see alike travels
//! through the Redis bus and is applied by every node, the publishing one
//! included, in bus order:
//!
//! * channel publishes (the `events` and `alerts` channels included): the
//!   bus payload is `{"ts": <publish time>, "data": <data>}` on the channel's
//!   own name; Redis assigns the offset, the same on every node. The
//!   publisher's ack is sent when its message comes back from the bus
//!   (matched by origin and `origin_seq`), with that offset.
//! * `events`: when applied from the bus they also feed the registration
//!   streams and the market (candles, filters, alerts), so candles are the
//!   same on every node for the same trades. An event without `ts` is
//!   dated by its publish time, carried in the bus payload.
//! * chat lines: bus channel `#chat/<room>` (a name no client channel can
//!   have), payload `{"kind","nick","text","ts"}`; each node delivers them
//!   to its own members of the room and keeps the room's history.
//! * channel settings (`create`): resolved with the creating node's
//!   defaults into a [`ChannelDefinition`] and sent as a link definition;
//!   the first definition of a channel Redis records is the one every node
//!   applies (creating the channel, or replacing the defaults of one that a
//!   message created), and the `create` ack waits for it and reports it,
//!   with `"created"` true only for the definition that won. A channel that
//!   has the cluster's definition already is answered at once
//!   (`"created": false`). Nodes load every definition when their link
//!   comes up, and `/readyz` says ready only once they are applied. A
//!   channel never `create`d has each node's defaults.
//! * chat presence ([`super::chat::presence`]): each node writes its room
//!   members to Redis as they join, leave and change nick, and again after
//!   every reconnect and data reset (another node may have removed them
//!   while this node's alive key had expired); `chat.who` and `/who` ask
//!   Redis and list the members on every live node (while the link is
//!   down: this node's, with `"local": true`). `chat.rooms` and `/rooms`
//!   count every live node's members of every room the same way.
//! * joins: the ack of a `chat.join` (and `/join`) waits for Redis: the
//!   room's latest lines from its channel stream (`fanout:ch:#chat/ROOM`)
//!   are replayed, and its `members` are every node's; lines arriving
//!   meanwhile are held and follow the replay, without those it replayed
//!   (told by offset). Redis unreachable: this node's history and members,
//!   `"local": true`.
//! * nicks ([`super::chat::nicks`]): every member's nick is reserved in
//!   Redis under the node's alive key; `chat.nick` and `/nick` are
//!   answered when Redis decided (while the link is down: by this node
//!   alone, `"local": true`, and settled when it is back).
//!
//! ## While the link is not up
//!
//! Local service continues: a publish is delivered to this node's
//! subscribers at once with `"offset": null, "local": true` (its ack says
//! the same) and is also queued for Redis. When it comes back on the bus
//! (after reconnection) this node does not deliver it again, but stores it
//! in the channel backlog under its offset; the other nodes deliver it
//! then, normally. Messages the link reports lost (outbound queue full,
//! rejected by Redis, trimmed from the bus before this node read them) are
//! counted in `/metrics` (`fanout_redis_lost_total`) and logged once per
//! kind; a publisher waiting for the ack of a rejected message gets an
//! `unavailable` error.
//!
//! A `create` while the link is not up makes the channel here at once
//! (`"local": true`; a second `create` of it: `"created": false, "local":
//! true`) and queues its definition; when the link is back the first
//! definition Redis records wins on every node, possibly another node's,
//! which then replaces the local settings (logged, and counted in
//! `fanout_redis_local_definitions_overridden_total`). When the link's
//! queue is full a `create` is refused (`unavailable`) rather than made on
//! this node alone. If Redis loses its data, each node offers the
//! definitions it holds again; they are the same on every node, so the
//! same ones win.
//!
//! ## Exactly once
//!
//! Every payload carries `"i"`, a random id of the publishing process; a
//! node's messages come in `origin_seq` order, so a message whose
//! (origin, `"i"`, `origin_seq`) is not above the highest seen is a second
//! copy (the link resends a publish whose outcome it could not tell, and a
//! Redis that lost its data in between cannot recognise the resend) and is
//! skipped. The ack's `delivered` counts this node's subscribers.

use std::collections::HashMap;

use log::{info, warn};
use serde_json::{json, Value};

use super::channels::definition::ChannelDefinition;
use super::chat::nicks::PendingClaim;
use super::chat::presence::PresenceChange;
use super::chat::redis::scripts::{self, PRESENCE_WRITES};
use super::chat::redis::{JoinWaiting, WhoWaiting};
use super::ConnId;
use crate::cluster::{
    Full, Inbound, LinkState, LinkStats, LostKind, RedisLink, ScriptCall, ScriptMode, WriteCommand,
};

/// Where this node's messages go to reach every node.
#[derive(Debug)]
pub enum Bus {
    /// A single node: nowhere else.
    Local,
    /// Scale-out over Redis (`--redis`).
    Redis(Box<RedisBus>),
}

/// What became of a channel message handed to a bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// A single node: the caller numbers it (the channel's next offset)
    /// and applies it now.
    Here,
    /// Queued for Redis, which numbers it; it is applied, and its ack
    /// sent, when it comes back on the bus.
    Pending,
    /// The link is not up or its queue is full: the caller delivers it on
    /// this node alone, unnumbered (`"offset": null, "local": true`).
    Fallback,
}

/// Takes channel messages: [`Bus`] whichever kind it is, or a
/// [`RedisBus`] directly (while applying what Redis handed over, which
/// may publish alerts).
pub trait MessageBus {
    /// Offers a channel message published at `ts` (ms since the epoch).
    /// `reply` names who waits for its ack, asked only if the message
    /// goes through Redis (a single node acks at once: no bookkeeping).
    fn send(
        &mut self,
        channel: &str,
        ts: u64,
        data: &Value,
        reply: impl FnOnce() -> Option<Reply>,
    ) -> Route;
}

impl MessageBus for Bus {
    fn send(
        &mut self,
        channel: &str,
        ts: u64,
        data: &Value,
        reply: impl FnOnce() -> Option<Reply>,
    ) -> Route {
        match self {
            Bus::Local => Route::Here,
            Bus::Redis(redis) => redis.send(channel, ts, data, reply),
        }
    }
}

impl MessageBus for RedisBus {
    fn send(
        &mut self,
        channel: &str,
        ts: u64,
        data: &Value,
        reply: impl FnOnce() -> Option<Reply>,
    ) -> Route {
        let payload = message_payload(&self.run, ts, data);
        self.publish(channel, payload, reply())
    }
}

impl Bus {
    /// The Redis bus, for what only it has (readiness, metrics).
    pub fn redis(&self) -> Option<&RedisBus> {
        match self {
            Bus::Local => None,
            Bus::Redis(redis) => Some(redis),
        }
    }
}

/// What the Redis bus needs of its link: [`RedisLink`] in production; unit
/// tests put a fake in its place to script Redis's answers. Every call
/// only queues (never blocks); answers come back through `drain`.
pub trait Transport: Send {
    fn node_id(&self) -> &str;
    fn state(&self) -> LinkState;
    fn stats(&self) -> LinkStats;
    fn publish(&self, channel: &str, payload: String) -> Result<u64, Full>;
    fn define(&self, channel: &str, definition: String) -> Result<u64, Full>;
    fn alive_id(&self) -> String;
    fn script(&self, call: ScriptCall, mode: ScriptMode) -> Result<u64, Full>;
    fn write(&self, what: &'static str, commands: Vec<WriteCommand>) -> Result<(), Full>;
    fn history(&self, channel: &str, after_offset: u64, limit: usize) -> Result<u64, Full>;
    fn recent(&self, channel: &str, limit: usize) -> Result<u64, Full>;
    /// Everything that arrived since the last call, oldest first.
    fn drain(&self) -> Vec<Inbound>;
}

impl Transport for RedisLink {
    fn node_id(&self) -> &str {
        RedisLink::node_id(self)
    }
    fn state(&self) -> LinkState {
        RedisLink::state(self)
    }
    fn stats(&self) -> LinkStats {
        RedisLink::stats(self)
    }
    fn publish(&self, channel: &str, payload: String) -> Result<u64, Full> {
        RedisLink::publish(self, channel, payload)
    }
    fn define(&self, channel: &str, definition: String) -> Result<u64, Full> {
        RedisLink::define(self, channel, definition)
    }
    fn alive_id(&self) -> String {
        RedisLink::alive_id(self)
    }
    fn script(&self, call: ScriptCall, mode: ScriptMode) -> Result<u64, Full> {
        RedisLink::script(self, call, mode)
    }
    fn write(&self, what: &'static str, commands: Vec<WriteCommand>) -> Result<(), Full> {
        RedisLink::write(self, what, commands)
    }
    fn history(&self, channel: &str, after_offset: u64, limit: usize) -> Result<u64, Full> {
        RedisLink::history(self, channel, after_offset, limit)
    }
    fn recent(&self, channel: &str, limit: usize) -> Result<u64, Full> {
        RedisLink::recent(self, channel, limit)
    }
    fn drain(&self) -> Vec<Inbound> {
        RedisLink::drain(self).collect()
    }
}

/// Who is waiting for an ack.
#[derive(Debug, Clone)]
pub struct Reply {
    pub conn: ConnId,
    pub serial: u64,
    pub id: Option<Value>,
}

/// One of this node's publishes or channel definitions on its way
/// through Redis.
#[derive(Debug)]
pub struct Pending {
    /// Delivered (or created) locally already (the link was not up).
    pub local: bool,
    pub reply: Option<Reply>,
}

/// A `subscribe` with `since` waiting for Redis history.
#[derive(Debug)]
pub struct Resume {
    pub reply: Reply,
    pub channel: String,
    pub since: u64,
}

/// The key of something waiting for Redis. The link numbers publishes and
/// definitions (`origin_seq`) apart from reads and nick claims (request
/// ids), and a join is two reads, so each has its own kind of key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Ticket {
    /// A publish or definition, by the `origin_seq` the link answered.
    Seq(u64),
    /// A history, `who` or rooms read, or a nick claim, by request id.
    Request(u64),
    /// A join waiting for its two reads, by join number.
    Join(u64),
}

/// Something waiting for Redis.
#[derive(Debug)]
pub enum Waiting {
    Publish(Pending),
    Definition(Pending),
    Resume(Resume),
    Who(WhoWaiting),
    /// `chat.rooms` (or, `plain`, a `/rooms`).
    Rooms {
        reply: Reply,
        plain: bool,
    },
    Join(JoinWaiting),
    /// One of the two reads of the join it names.
    JoinPart(u64),
    NickClaim(PendingClaim),
}

/// App-level counters of the scale-out.
#[derive(Debug, Default, Clone, Copy)]
pub struct BusStats {
    /// Messages delivered by this node alone while the link was not up.
    pub local_deliveries: u64,
    pub lost_queue_full: u64,
    pub lost_rejected: u64,
    pub lost_bus_gap: u64,
    pub resets: u64,
    /// Bus payloads this node could not understand.
    pub malformed: u64,
    /// Second copies of a message, skipped.
    pub duplicates: u64,
    /// Channel definitions from Redis this node could not apply (channel
    /// limit reached, a name this version refuses).
    pub definitions_not_applied: u64,
    /// Channels whose settings a `create` made here during an outage and
    /// the cluster's definition then changed.
    pub local_definitions_overridden: u64,
    /// Members renamed because another node's member held their nick
    /// (taken here during an outage, or a guest nick a user chose).
    pub nick_conflicts: u64,
}

#[derive(Debug, Default)]
struct Warned {
    queue_full: bool,
    rejected: bool,
    bus_gap: bool,
    malformed: bool,
    definition_not_applied: bool,
    presence_lost: bool,
    nick_claim_failed: bool,
}

/// Scale-out over Redis: the link, and this node's bookkeeping of what
/// goes through it.
pub struct RedisBus {
    link: Box<dyn Transport>,
    pub node_id: String,
    /// The link's node run id in Redis ([`RedisLink::alive_id`]), under
    /// which chat keeps its presence and nicks.
    pub alive_id: String,
    /// Everything waiting for Redis, in one table.
    waiting: HashMap<Ticket, Waiting>,
    next_join: u64,
    pub stats: BusStats,
    /// This process's run, in every bus payload it sends (`"i"`), so that
    /// duplicates can be told by (origin, run, origin_seq).
    pub run: String,
    /// The highest `origin_seq` applied per (origin, run).
    seen: HashMap<(String, String), u64>,
    warned: Warned,
    /// A `Down` was seen and no `Up` since.
    was_down: bool,
    /// The `Up` was applied, so the channel definitions loaded with it
    /// are in force here (`/readyz`).
    synced: bool,
}

impl std::fmt::Debug for RedisBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBus")
            .field("node_id", &self.node_id)
            .field("waiting", &self.waiting.len())
            .finish()
    }
}

impl RedisBus {
    pub fn new(link: Box<dyn Transport>) -> RedisBus {
        RedisBus {
            node_id: link.node_id().to_owned(),
            alive_id: link.alive_id(),
            link,
            waiting: HashMap::new(),
            next_join: 0,
            stats: BusStats::default(),
            run: format!("{:016x}", crate::cluster::protocol::random_u64()),
            seen: HashMap::new(),
            warned: Warned::default(),
            was_down: false,
            synced: false,
        }
    }

    /// The link, to queue reads and claims on (the answer's request id
    /// then goes into [`RedisBus::wait`]).
    pub fn link(&self) -> &dyn Transport {
        &*self.link
    }

    /// Notes what waits for Redis's answer to `ticket`.
    pub fn wait(&mut self, ticket: Ticket, waiting: Waiting) {
        self.waiting.insert(ticket, waiting);
    }

    /// What waited for `ticket`, which Redis answered.
    pub fn take(&mut self, ticket: Ticket) -> Option<Waiting> {
        self.waiting.remove(&ticket)
    }

    pub fn get_mut(&mut self, ticket: Ticket) -> Option<&mut Waiting> {
        self.waiting.get_mut(&ticket)
    }

    /// A number for a join, which waits under [`Ticket::Join`].
    pub fn next_join(&mut self) -> u64 {
        let key = self.next_join;
        self.next_join += 1;
        key
    }

    /// The nick claims on their way through Redis, by request.
    pub fn nick_claims(&self) -> impl Iterator<Item = (u64, &PendingClaim)> {
        self.waiting
            .iter()
            .filter_map(|(ticket, waiting)| match (ticket, waiting) {
                (Ticket::Request(request), Waiting::NickClaim(claim)) => Some((*request, claim)),
                _ => None,
            })
    }

    pub fn nick_claim_mut(&mut self, request: u64) -> Option<&mut PendingClaim> {
        match self.waiting.get_mut(&Ticket::Request(request)) {
            Some(Waiting::NickClaim(claim)) => Some(claim),
            _ => None,
        }
    }

    pub fn is_up(&self) -> bool {
        self.link.state() == LinkState::Up
    }

    /// Up, and what came with the `Up` (channel definitions) applied.
    pub fn is_ready(&self) -> bool {
        self.synced && self.is_up()
    }

    /// Queues a channel definition for Redis. `reply` waits for the
    /// definition in force (None: answered already, `local` says whether
    /// it was applied here already).
    pub fn define(
        &mut self,
        channel: &str,
        definition: &ChannelDefinition,
        local: bool,
        reply: Option<Reply>,
    ) -> Result<(), Full> {
        let seq = self.link.define(channel, definition.encode())?;
        self.wait(
            Ticket::Seq(seq),
            Waiting::Definition(Pending { local, reply }),
        );
        Ok(())
    }

    /// Sends a chat presence change to Redis; one that does not fit the
    /// link's queue is counted by the link and logged here once.
    pub fn presence(&mut self, change: &PresenceChange) {
        let member = change.conn as u64;
        let writes =
            scripts::presence(&self.alive_id, &change.room, member, change.nick.as_deref());
        if self.link.write(PRESENCE_WRITES, writes).is_err()
            && !std::mem::replace(&mut self.warned.presence_lost, true)
        {
            warn!("chat presence change not sent: the redis link's queue is full; `who` on other nodes may be wrong until this node reconnects (counted in fanout_redis_presence_lost_total, logged once)");
        }
    }

    /// Redis answered a nick claim with an error (a script refused, out
    /// of memory): the member keeps the nick on this node's word alone.
    pub fn nick_claim_failed(&mut self, nick: &str, why: &str) {
        if !std::mem::replace(&mut self.warned.nick_claim_failed, true) {
            warn!("nick {nick} could not be reserved in redis ({why}); it is unique on this node only (logged once)");
        }
    }

    /// A definition from Redis could not be applied here.
    pub fn definition_not_applied(&mut self, channel: &str, why: &str) {
        self.stats.definitions_not_applied += 1;
        if !std::mem::replace(&mut self.warned.definition_not_applied, true) {
            warn!("the cluster's definition of channel `{channel}` is not applied on this node: {why}; counted in fanout_redis_definitions_not_applied_total (logged once)");
        }
    }

    /// Queues a bus payload (a channel message or a chat line): pending
    /// when the link is up, else (not up, or its queue is full) to be
    /// delivered here at once by the caller.
    pub fn publish(&mut self, channel: &str, payload: String, reply: Option<Reply>) -> Route {
        let up = self.is_up();
        match self.link.publish(channel, payload) {
            Ok(seq) => {
                let local = !up;
                let reply = if local { None } else { reply };
                self.wait(Ticket::Seq(seq), Waiting::Publish(Pending { local, reply }));
                if local {
                    self.stats.local_deliveries += 1;
                    Route::Fallback
                } else {
                    Route::Pending
                }
            }
            Err(_) => {
                self.stats.local_deliveries += 1;
                Route::Fallback
            }
        }
    }

    pub fn on_up(&mut self) {
        self.synced = true;
        if std::mem::take(&mut self.was_down) {
            let in_flight = self
                .waiting
                .values()
                .filter(|w| matches!(w, Waiting::Publish(_)))
                .count();
            info!("redis link up again: resuming cluster delivery ({in_flight} publish(es) in flight)");
        }
    }

    pub fn on_down(&mut self) {
        self.was_down = true;
        self.synced = false;
    }

    /// Counts and logs (once per kind) messages that will never arrive.
    /// Answers who waits for a refused publish or definition, and which of
    /// the two it was.
    pub fn on_lost(&mut self, count: u64, kind: LostKind) -> Option<(Reply, &'static str)> {
        let (counter, warned, what) = match kind {
            LostKind::QueueFull => (
                &mut self.stats.lost_queue_full,
                &mut self.warned.queue_full,
                "the redis link's outbound queue was full (delivered on this node only)",
            ),
            LostKind::Rejected { .. } => (
                &mut self.stats.lost_rejected,
                &mut self.warned.rejected,
                "redis refused the publish",
            ),
            LostKind::BusGap => (
                &mut self.stats.lost_bus_gap,
                &mut self.warned.bus_gap,
                "the redis bus was trimmed before this node read them",
            ),
        };
        *counter += count;
        if !std::mem::replace(warned, true) {
            warn!("{count} cluster message(s) lost: {what}; counted in fanout_redis_lost_total (logged once)");
        }
        match kind {
            LostKind::Rejected { origin_seq } => match self.take(Ticket::Seq(origin_seq))? {
                Waiting::Publish(p) => p.reply.map(|r| (r, "message")),
                Waiting::Definition(p) => p.reply.map(|r| (r, "channel definition")),
                _ => None,
            },
            _ => None,
        }
    }

    /// Whether a bus message was applied already. A node's messages come
    /// in `origin_seq` order; the link resends a publish whose outcome it
    /// could not tell, and if Redis lost its data meanwhile that resend is
    /// a second copy, which this skips.
    pub fn is_duplicate(&mut self, origin: &str, run: &str, origin_seq: u64) -> bool {
        let key = (origin.to_owned(), run.to_owned());
        let seen = self.seen.entry(key).or_insert(0);
        if origin_seq <= *seen {
            self.stats.duplicates += 1;
            return true;
        }
        *seen = origin_seq;
        false
    }

    pub fn malformed(&mut self, channel: &str, why: &str) {
        self.stats.malformed += 1;
        if !std::mem::replace(&mut self.warned.malformed, true) {
            warn!("bus message on `{channel}` not understood ({why}); skipped and counted (logged once)");
        }
    }
}

/// The bus payload of a channel message (`run`: [`RedisBus::run`]).
pub fn message_payload(run: &str, ts: u64, data: &Value) -> String {
    json!({ "i": run, "ts": ts, "data": data }).to_string()
}

/// The `"i"` of a bus payload.
pub fn payload_run(payload: &str) -> String {
    #[derive(serde::Deserialize)]
    struct Run {
        #[serde(default)]
        i: String,
    }
    serde_json::from_str::<Run>(payload)
        .map(|r| r.i)
        .unwrap_or_default()
}

/// Decodes [`message_payload`].
pub fn parse_message_payload(payload: &str) -> Option<(u64, Value)> {
    let mut v: Value = serde_json::from_str(payload).ok()?;
    let ts = v.get("ts")?.as_u64()?;
    let data = v.get_mut("data")?.take();
    Some((ts, data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_payloads_round_trip() {
        let data = json!({"type": "trade", "price": "1.5"});
        let p = message_payload("r1", 42, &data);
        assert_eq!(parse_message_payload(&p), Some((42, data)));
        assert_eq!(payload_run(&p), "r1");
        assert_eq!(parse_message_payload("nope"), None);
    }
}
