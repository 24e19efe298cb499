//! Scale-out: the app's side of the Redis link ([`crate::cluster`]).
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
//! # While the link is not up
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
//! # Exactly once
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
use super::chat::{ChatLine, LineKind};
use super::ConnId;
use crate::cluster::{Full, HistoryEntry, LinkState, LostKind, RedisLink};

/// Prefix of the bus channels that carry chat rooms.
pub const CHAT_PREFIX: &str = "#chat/";

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

/// A `who` waiting for Redis's answer.
#[derive(Debug)]
pub struct WhoWaiting {
    pub reply: Reply,
    pub room: String,
    /// A plain-text `/who` (else a JSON `chat.who`).
    pub plain: bool,
}

/// A join waiting for Redis: the room's latest lines and its members on
/// every node (each None until answered; an error: this node's instead).
#[derive(Debug)]
pub struct JoinWaiting {
    pub reply: Reply,
    pub room: String,
    pub recent: Option<Result<(Vec<ChatLine>, u64), String>>,
    pub members: Option<Result<Vec<String>, String>>,
}

/// App-level counters of the scale-out.
#[derive(Debug, Default, Clone, Copy)]
pub struct ClusterStats {
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

pub struct ScaleOut {
    pub link: RedisLink,
    pub node_id: String,
    pub pending: HashMap<u64, Pending>,
    /// This node's channel definitions on their way through Redis, by
    /// `origin_seq`.
    pub definitions: HashMap<u64, Pending>,
    pub resumes: HashMap<u64, Resume>,
    pub whos: HashMap<u64, WhoWaiting>,
    /// `chat.rooms` (or, `true`, plain `/rooms`) waiting for Redis.
    pub rooms_waiting: HashMap<u64, (Reply, bool)>,
    /// Joins waiting for Redis, by join number; `join_parts` maps the
    /// history and `who` requests to it.
    pub joins: HashMap<u64, JoinWaiting>,
    pub join_parts: HashMap<u64, u64>,
    pub next_join: u64,
    /// Nick claims on their way through Redis, by request.
    pub nick_claims: HashMap<u64, PendingClaim>,
    pub stats: ClusterStats,
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

impl std::fmt::Debug for ScaleOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScaleOut")
            .field("node_id", &self.node_id)
            .field("pending", &self.pending.len())
            .field("resumes", &self.resumes.len())
            .finish()
    }
}

impl ScaleOut {
    pub fn new(link: RedisLink) -> ScaleOut {
        ScaleOut {
            node_id: link.node_id().to_owned(),
            link,
            pending: HashMap::new(),
            definitions: HashMap::new(),
            resumes: HashMap::new(),
            whos: HashMap::new(),
            rooms_waiting: HashMap::new(),
            nick_claims: HashMap::new(),
            joins: HashMap::new(),
            join_parts: HashMap::new(),
            next_join: 0,
            stats: ClusterStats::default(),
            run: format!("{:016x}", crate::cluster::protocol::random_u64()),
            seen: HashMap::new(),
            warned: Warned::default(),
            was_down: false,
            synced: false,
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
        self.definitions.insert(seq, Pending { local, reply });
        Ok(())
    }

    /// Sends a chat presence change to Redis; one that does not fit the
    /// link's queue is counted by the link and logged here once.
    pub fn presence(&mut self, change: &PresenceChange) {
        let member = change.conn as u64;
        if self
            .link
            .presence(&change.room, member, change.nick.as_deref())
            .is_err()
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

    /// Queues a publish. Answers whether the caller must deliver it locally
    /// now (the link is not up, or its queue is full).
    pub fn publish(&mut self, channel: &str, payload: String, reply: Option<Reply>) -> bool {
        let up = self.is_up();
        match self.link.publish(channel, payload) {
            Ok(seq) => {
                let local = !up;
                self.pending.insert(
                    seq,
                    Pending {
                        local,
                        reply: if local { None } else { reply },
                    },
                );
                if local {
                    self.stats.local_deliveries += 1;
                }
                local
            }
            Err(_) => {
                self.stats.local_deliveries += 1;
                true
            }
        }
    }

    pub fn on_up(&mut self) {
        self.synced = true;
        if std::mem::take(&mut self.was_down) {
            info!(
                "redis link up again: resuming cluster delivery ({} publish(es) in flight)",
                self.pending.len()
            );
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
            LostKind::Rejected { origin_seq } => match self.pending.remove(&origin_seq) {
                Some(p) => p.reply.map(|r| (r, "message")),
                None => self
                    .definitions
                    .remove(&origin_seq)
                    .and_then(|p| p.reply)
                    .map(|r| (r, "channel definition")),
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

/// The bus payload of a channel message (`run`: [`ScaleOut::run`]).
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

/// The chat lines of a room's history from Redis (with their offsets);
/// entries that are not chat lines are skipped and counted by the caller.
pub fn chat_history(room: &str, entries: &[HistoryEntry]) -> (Vec<ChatLine>, usize) {
    let mut malformed = 0;
    let lines = entries
        .iter()
        .filter_map(|e| {
            let line = parse_chat_payload(room, &e.payload).map(|mut line| {
                line.offset = Some(e.offset);
                line
            });
            malformed += usize::from(line.is_none());
            line
        })
        .collect();
    (lines, malformed)
}

pub fn chat_payload(run: &str, line: &ChatLine) -> String {
    json!({ "i": run, "kind": line.kind.as_str(), "nick": line.nick, "text": line.text, "ts": line.ts })
        .to_string()
}

pub fn parse_chat_payload(room: &str, payload: &str) -> Option<ChatLine> {
    let v: Value = serde_json::from_str(payload).ok()?;
    Some(ChatLine {
        room: room.to_owned(),
        nick: v.get("nick")?.as_str()?.to_owned(),
        text: v.get("text")?.as_str()?.to_owned(),
        kind: LineKind::parse(v.get("kind")?.as_str()?)?,
        ts: v.get("ts")?.as_u64()?,
        offset: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip() {
        let data = json!({"type": "trade", "price": "1.5"});
        let p = message_payload("r1", 42, &data);
        assert_eq!(parse_message_payload(&p), Some((42, data)));
        assert_eq!(payload_run(&p), "r1");
        let line = ChatLine {
            room: "lobby".into(),
            nick: "ann".into(),
            text: "hi".into(),
            kind: LineKind::Me,
            ts: 7,
            offset: None,
        };
        assert_eq!(
            parse_chat_payload("lobby", &chat_payload("r2", &line)),
            Some(line)
        );
        assert_eq!(parse_message_payload("nope"), None);
    }

    #[test]
    fn chat_history_keeps_offsets_and_counts_what_is_not_a_line() {
        let line = ChatLine {
            room: "ops".into(),
            nick: "ann".into(),
            text: "hi".into(),
            kind: LineKind::Say,
            ts: 7,
            offset: None,
        };
        let entry = |offset, payload: String| HistoryEntry {
            offset,
            origin: "node-a".into(),
            origin_seq: 1,
            payload,
        };
        let entries = [
            entry(4, chat_payload("r", &line)),
            entry(5, "{\"kind\":\"shout\"}".into()),
        ];
        let (lines, malformed) = chat_history("ops", &entries);
        assert_eq!(malformed, 1);
        assert_eq!(
            lines,
            vec![ChatLine {
                offset: Some(4),
                ..line
            }]
        );
    }
}
